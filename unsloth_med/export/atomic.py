"""Atomic export folders: written into a hidden `.NAME.partial-*` sibling, `export.json` last, then renamed
to NAME with `os.replace`. An export that fails or is interrupted leaves no NAME folder (and an older one
untouched); a dead process's leftovers are removed by the next export."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from ..disk import disk_full_message, folder_bytes, is_disk_full, mib
from ..errors import ExportError
from ..secrets import redact

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- atomic folders
def _partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out_dir: Path) -> None:
    """Partial folders left by an export that was killed (its process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(partial|old)-(\d+)-[0-9a-f]+$")
    if not out_dir.parent.is_dir():
        return
    for path in out_dir.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(2))):
            log.info("Removing %s, left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished tmp folder to out_dir, replacing an older export there."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Publishing replaces what is at out_dir: only an earlier export (its export.json, written last, says it
    was one) or an empty folder. `--out ~/models` or `--out RUN_DIR` deleted that folder and everything in it."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and (
            (out_dir / "export.json").is_file() or not any(out_dir.iterdir())):
        return
    what = "a file" if not out_dir.is_dir() else "a folder that holds no export (no export.json)"
    raise ExportError(f"{out_dir} is {what}; an export replaces what is at its destination, so nothing was written. "
                      "Choose a new folder (--out), or move that one away first.")


class _AtomicDir:
    """`with _AtomicDir(out) as tmp:` write into tmp; published as `out` only if the block completes."""

    def __init__(self, out_dir: Path, needed_bytes: int | None = None):
        self.out_dir, self.needed_bytes = out_dir, needed_bytes

    def __enter__(self) -> Path:
        _check_replaceable(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.out_dir)
        self.tmp = _partial_dir(self.out_dir)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                _publish(self.tmp, self.out_dir)
                return False
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        written = folder_bytes(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if exc is not None and is_disk_full(exc, self.out_dir.parent):
            what = f"the export {self.out_dir.name}"
            raise ExportError(disk_full_message(self.out_dir.parent, what, self.needed_bytes)
                              + f" ({mib(written)} were written before it filled; that partial folder was removed, so "
                              f"nothing new at {self.out_dir} looks complete). Then export again.") from exc
        return False


def _write_json(path: Path, data: dict) -> None:
    path.write_text(redact(json.dumps(data, indent=1, default=str)))


def _folder_listing(folder: Path) -> tuple[list[str], int]:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return files, sum((folder / f).stat().st_size for f in files)


def _check_no_secrets(folder: Path) -> None:
    from ..hub import files_with_secrets

    leaked = files_with_secrets(folder)
    if leaked:
        raise ExportError("The export would contain the value of a secret (an environment variable or a token "
                          f"option) in: {', '.join(leaked)}. Nothing was written. "
                          "Remove the secret from the config or model files and export again.")


def _recipe_info(recipe, model_name: str | None = None) -> dict:
    """What unsloth_med.json records of the recipe (its resolved instruction, labels and data source: enough to
    describe and rebuild it) and the model as the user named it (e.g. tiny:mistral3, not a cache path)."""
    from ..recipes import recipe_record

    return {**recipe_record(recipe), **({"model": model_name} if model_name else {})}
