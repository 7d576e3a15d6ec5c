"""Running torch.compile'd functions (Unsloth's compiled modules) as plain Python: no tracing, no compiling.

Evaluation's label scoring, the memory plan's probe steps and `--train_compiled false` training use it, where
tracing costs more than it returns (benchmarks/README.md). It needs torch.compiler.set_stance (torch >= 2.6); the
package allows torch 2.4, on which everything traces as before and says so.
"""
from __future__ import annotations

import contextlib

import torch


def can_run_eager() -> bool:
    """Whether this torch can switch compiled functions to plain Python (read at call time: tests remove it)."""
    return hasattr(torch.compiler, "set_stance")


def eager_stance(enabled: bool = True):
    """A context in which torch.compile'd functions run as plain Python; a no-op when not `enabled` or unsupported."""
    if enabled and can_run_eager():
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()
