"""Writing to disk: JSON records updated in place (a reader never meets half a file), and full disks: recognise
them in whatever form a library reports them, and say what to free and where.

A full disk reaches us as OSError(ENOSPC) from Python, as "IoError(... StorageFull ...)" from safetensors
(Rust), or as "file write failed" from torch.save, so the exception chain's texts are checked, and the
folder's free space decides the ambiguous cases.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

FULL_TEXTS = ("no space left", "storagefull", "os error 28", "disk quota exceeded", "file write failed")
NEARLY_FULL_BYTES = 1 << 20  # below 1 MiB free, a failed write is taken to be the full disk


def update_json(path: Path, fields: dict, *, drop: tuple[str, ...] = ()) -> None:
    """Write `fields` into the JSON object at `path`, keeping the keys it already holds (less those in `drop`)."""
    kept = json.loads(path.read_text()) if path.is_file() else {}
    kept = {key: value for key, value in kept.items() if key not in drop}
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps({**kept, **fields}, indent=1))
    os.replace(partial, path)  # a reader never meets a half-written file


def write_json(path: Path, data) -> None:
    """Write a JSON file whole or not at all: a kill or a full disk mid-write leaves the earlier file (or none), never
    a truncated one that the next run or command fails to read."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def folder_bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def free_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def is_disk_full(exc: BaseException, folder: str | Path) -> bool:
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if any(t in text for t in FULL_TEXTS[:4]):
            return True
        if FULL_TEXTS[4] in text and free_bytes(folder) < NEARLY_FULL_BYTES:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def disk_full_message(folder: str | Path, what: str, needed_bytes: int | None) -> str:
    needed = f"it needs about {mib(needed_bytes)}" if needed_bytes else "its size is not known in advance"
    return (f"Disk full while writing {what} into {folder}: {mib(free_bytes(folder))} free there, and {needed}. "
            "Free space on that disk, or write to a folder on another disk")
