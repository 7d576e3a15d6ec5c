"""What every command shares: the one-line error style and an argparse whose errors are ConfigError."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, UnslothMedError


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, a cloud VM's preemption, a scheduler's stop), ended as Ctrl-C ends a command: run.json's
    time breakdown, the finish hint of a run stopped after training, the lock released, a partial export removed.
    The default action ended the process at once, with none of them and no word on stderr."""


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Under a multi-process launcher (torchrun, accelerate launch) SIGTERM keeps its default: the launcher sends it
    to every rank when one fails, and a rank waiting in a collective would run no handler until the launcher's kill
    timeout; each rank would also report a failure that is another rank's."""
    from ..distributed import launched_world_size

    if launched_world_size() > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def friendly(fn: Callable[[], int | None]) -> int:
    """Run a command: expected problems (bad data, missing credentials, no GPU) print one `error:` line, exit 2."""
    try:
        with _sigterm_as_interrupt():
            return fn() or 0
    except UnslothMedError as exc:
        from ..secrets import redact

        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Not "continue with --resume" alone: a run without checkpoints (save_strategy no) would train again from
        # step 0, and one stopped after training needs none (the pipeline's hint above says what finishes it).
        print(f"{'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}: a training run's run.json "
              "says the stage it stopped in; --resume continues from its last checkpoint, if it saved one (see the "
              "lines above)", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130


def output_file(path: str | None, flag: str) -> Path | None:
    """A command's output file, checked before its work: its folder is made, and a file that cannot be written is
    a ConfigError now, not a traceback after minutes of evaluation or data checks."""
    if path is None:
        return None
    import os

    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write {flag} {path}: {exc.strerror or exc}. Choose a writable path.") from exc
    if target.is_dir() or not os.access(target if target.exists() else target.parent, os.W_OK):
        raise ConfigError(f"cannot write {flag} {path}: {'it is a folder' if target.is_dir() else 'permission denied'}"
                          ". Choose a writable file path.")
    return target


def seconds_since_process_start() -> float | None:
    """How long this process has run (Linux: /proc), so a run's time breakdown can show what came before the job
    itself (the interpreter, imports, unsloth's among them, and parsing the flags). None where it cannot tell."""
    import os

    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            now = float(uptime.read().split()[0])
        return max(0.0, now - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def basic_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigError: printed as one `error: ...` line like every other error."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")
