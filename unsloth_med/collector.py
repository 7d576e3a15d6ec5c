"""The garbage collector's share of a run, and the one change that shrinks it.

Unsloth, transformers and accelerate call `gc.collect()` while they load a model and add adapters: 19 calls in a
quick trial on the 14B shape, 0.43-0.47 s each, 8.8 s of the run (cProfile on an H200, session 13; 5.6 s of it in
Unsloth's `get_peft_model` and `post_patch_model`). A full collection walks every object the collector tracks, and
once unsloth is imported that is mostly the imported libraries themselves (about half a million modules, classes
and functions after importing torch, transformers, peft, trl and datasets), which live until the process ends
anyway. `freeze_imports` moves them into the collector's permanent generation (`gc.freeze`), so later collections
walk only what the job creates. Side by side in one lease the collector took 8.1-8.6 s of a warm quick trial
without the freeze and 1.25-1.45 s with it (benchmarks/README.md).

`track` times every collection, so run.json says what the collector cost (`garbage_collection`).
"""
from __future__ import annotations

import gc
import time


class _Clock:
    """A gc callback: the seconds and number of collections since it was installed."""

    def __init__(self):
        self.seconds, self.collections, self._started = 0.0, 0, None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1
            self._started = None


_clock: _Clock | None = None


def track() -> tuple[int, float]:
    """Start timing collections (installed once per process) and return the totals so far, for `since`."""
    global _clock
    if _clock is None:
        _clock = _Clock()
        gc.callbacks.append(_clock)
    return _clock.collections, _clock.seconds


def freeze_imports() -> int:
    """Collect what is garbage now, then freeze everything still alive; returns how many objects are frozen.

    Only for a process whose command is the job (the CLI), called after the imports and before any model or data:
    a frozen object is never collected, which is right for imported modules but not for a library caller's objects.
    What the job creates afterwards is collected as before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def since(start: tuple[int, float]) -> dict:
    """For run.json: the collections since `start` (a `track()`) and their seconds, and how many objects are frozen."""
    collections, seconds = track()
    return {"collections": collections - start[0], "seconds": round(seconds - start[1], 3),
            "frozen_objects": gc.get_freeze_count()}
