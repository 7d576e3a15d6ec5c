"""Per-file results of the data checks, kept across runs in the package's cache folder.

Every run validates every image (data/validate.py) and compares every test image with every training image
(data/checks.py), and each of those decodes the whole file: on the 2-core CPU machine, 5.7-6.0 s and
2.8-3.0 s for the 1,129 bone-break X-rays, on every run. A file whose path, size and modification time are those
of a file an earlier run checked gets that run's result back instead (the identity the prepared-image cache uses,
data/prepare.py). Only successes are kept: a file that failed is checked again, and reported again, next run.
Anything wrong with the cache itself (a read-only or full disk, a locked or damaged database) only switches it
off for that call: the checks then run as they would without it.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from contextlib import closing
from typing import Any, Callable, Sequence

from .prepare import file_identity

log = logging.getLogger(__name__)

FILE_NAME = "image_checks.sqlite"


def kept_identity(source: Any) -> str | None:
    """An image file's identity (data/prepare.py's: path, size and modification time); None for anything else
    (bytes, in-memory images, a file that cannot be read), whose results are never kept."""
    if isinstance(source, dict):
        source = None if source.get("bytes") else source.get("path")
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        return file_identity(source)
    except OSError:
        return None


def _connect() -> sqlite3.Connection:
    from .sources import cache_dir

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(folder / FILE_NAME, timeout=30)  # ranks of one job may write at the same time
    try:
        db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    except sqlite3.Error:  # not a database: closed here, reported by the caller
        db.close()
        raise
    return db


def _read(keys: list) -> dict[str, bytes]:
    if not keys:
        return {}
    found: dict[str, bytes] = {}
    try:
        with closing(_connect()) as db, db:  # closed, not only committed
            for start in range(0, len(keys), 500):  # SQLite's limit on a statement's parameters
                part = keys[start:start + 500]
                rows = db.execute(f"SELECT key, value FROM results WHERE key IN ({','.join('?' * len(part))})", part)
                found.update(rows)
    except (sqlite3.Error, OSError) as exc:
        log.debug("image check cache not read: %s", exc)
        return {}
    return found


def _write(items: dict[str, bytes]) -> None:
    if not items:
        return
    try:
        with closing(_connect()) as db, db:
            db.executemany("INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)", list(items.items()))
    except (sqlite3.Error, OSError) as exc:
        log.debug("image check cache not written: %s", exc)


def remembered(check: str, sources: Sequence[Any], compute: Callable[[list], list], *,
               encode: Callable[[Any], bytes | None], decode: Callable[[bytes], Any]) -> list:
    """compute(sources) for the sources no earlier run checked, in their order; the others' results read back.

    `check` names what is computed (and its settings); `encode` gives the bytes to keep for a success, or None
    for a result not to keep (a failure); `decode` turns them back into the result, raising ValueError for bytes
    it cannot use (then the source is computed again).
    """
    keys = [f"{check}|{identity}" if (identity := kept_identity(s)) else None for s in sources]
    known = _read([k for k in keys if k])
    results: list = [None] * len(sources)
    todo = []
    for i, key in enumerate(keys):
        try:
            results[i] = decode(known[key])
        except (KeyError, ValueError):  # not checked before (or not a file), or kept bytes not usable
            todo.append(i)
    new: dict[str, bytes] = {}
    for i, value in zip(todo, compute([sources[i] for i in todo]) if todo else []):
        results[i] = value
        if keys[i] and (kept := encode(value)) is not None:
            new[keys[i]] = kept
    _write(new)
    return results
