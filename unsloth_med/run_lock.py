"""One run per run folder: a lock file that names its owner (pid, host) and dies with it.

The lock is an advisory `flock` on <run>/.unsloth_med.lock, held for the whole run. The kernel drops it
when the owning process ends in any way (kill -9, out of memory, power loss of a local machine), so a
lock left behind by a crash is recognised as stale: the file is still there, its owner's lock is not.
The file holds {"pid", "host", "since", "role"} only to say who owns a live lock (a run training, or an export)
and whose stale lock was taken over; `evaluate`, `predict` and `push` read the role to know what to wait for.
Where the filesystem has no flock (some network mounts), the owner's pid is checked instead when it ran on this
host; a lock from another host is then never taken over silently.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("unsloth_med")
LOCK_NAME = ".unsloth_med.lock"


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return {"unreadable": text[:80]}


def _describe(owner: dict | None) -> str:
    if not owner:
        return "an unknown process"
    if "unreadable" in owner:
        return f"an unreadable lock ({owner['unreadable']!r})"
    return f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('since')})"


class RunLock:
    """Held while a run writes into `run_dir`; `release()` (or process exit) frees it."""

    def __init__(self, run_dir: str | Path, *, when_busy: str = "Wait for it to finish, or use another --output_dir.",
                 role: str = "train"):
        self.path = Path(run_dir) / LOCK_NAME
        self.when_busy = when_busy  # what to do about a live owner: the refusal's last sentence
        self.role = role  # "train" or "export": what readers of the folder must wait for (training_owner)
        self.fd: int | None = None
        self.took_over: dict | None = None  # the stale owner replaced, if any

    def acquire(self) -> "RunLock":
        try:  # the run folder's first write: a folder that cannot be written stops the run here, in one line
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as exc:
            raise ConfigError(f"Cannot write the run folder {self.path.parent}: {exc.strerror or exc}. Choose an "
                              "--output_dir on a writable disk, with a shorter name where the name is too long."
                              ) from None
        for _ in range(5):  # retries only when the lock file was replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _read_owner(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy(owner) from None
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                fd = self._without_flock(owner)  # no flock here: judge by the owner's pid
            if not self._same_file(fd):  # the previous owner removed the file between our open and flock
                os.close(fd)
                continue
            owner = _read_owner(fd)
            if owner and owner.get("pid") != os.getpid():
                self.took_over = owner
                message = (f"Run folder {self.path.parent}: taking over a stale lock left by {_describe(owner)}; "
                           "that process is gone (crashed or killed).")
                log.warning(message)
                print(message, flush=True)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "role": self.role}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunFolderBusy(f"Run folder {self.path.parent}: its lock file keeps changing; another run is starting "
                            "there. Use another --output_dir.")

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _without_flock(self, owner: dict | None) -> int:
        if owner and owner.get("pid") is not None and owner.get("pid") != os.getpid():
            if owner.get("host") != socket.gethostname() or _pid_alive(int(owner["pid"])):
                raise self._busy(owner, unverifiable=owner.get("host") != socket.gethostname())
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def _busy(self, owner: dict | None, unverifiable: bool = False) -> RunFolderBusy:
        hint = (f" If you are sure it is no longer running, delete {self.path}." if unverifiable else
                f" {self.when_busy}")
        return RunFolderBusy(f"Run folder {self.path.parent} is in use by another run: {_describe(owner)}.{hint}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._same_file(self.fd):
                self.path.unlink(missing_ok=True)  # unlink while still holding: no one locks a file being removed
        finally:
            os.close(self.fd)
            self.fd = None


RUN_MARKERS = ("config.yaml", "run.json")  # a folder holding either is a run folder of its own


def training_owner(folder: str | Path) -> dict | None:
    """The live process that holds `folder`'s lock, or that of the run folder `folder` sits in (its adapter/, an
    export), where what it does changes `folder`; else None.

    A training run (a --resume) replaces the adapter and sets the exports aside when it ends: everything in the
    folder waits for it. An export only reads the run and its adapter and writes its own folder: only the folders
    beside the adapter wait for it. A checkpoint-N folder is complete once saved and never replaced, and a run
    folder inside another is judged by its own lock. Only probed, with a shared lock released at once: two readers
    never keep each other, or a later run, out."""
    folder = Path(folder)
    if not folder.is_dir() or folder.name.startswith("checkpoint-"):
        return None
    is_run = any((folder / name).exists() for name in RUN_MARKERS)
    for run_dir in (folder,) if is_run else (folder, folder.parent):
        owner = _live_owner(run_dir / LOCK_NAME)
        if owner is None:
            continue
        if owner.get("role") == "export" and (run_dir == folder or folder.name == "adapter"):
            continue  # the export reads these and writes elsewhere
        return owner
    return None


def _live_owner(path: Path) -> dict | None:
    """The owner of the lock file `path` while a live process other than this one holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_owner(fd) or {}
            if owner.get("pid") == os.getpid():  # this process's own run (its export, its evaluation)
                return None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return owner
            # no flock on this filesystem: judge by the owner's pid, on this host
            if owner.get("host") == socket.gethostname() and owner.get("pid") is not None \
                    and _pid_alive(int(owner["pid"])):
                return owner
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def refuse_while_training(folder: str | Path, action: str) -> None:
    """RunFolderBusy when a live process changes `folder` (see training_owner); `action` says what waits."""
    owner = training_owner(folder)
    if owner is not None:
        doing = ("an export writing there replaces its exports" if owner.get("role") == "export" else
                 "a run training there replaces its adapter and exports when it ends")
        raise RunFolderBusy(f"{folder} belongs to a run folder in use by another process now ({_describe(owner)}): "
                            f"{doing}. {action} once that has finished, or use one of its checkpoint-N folders now.")
