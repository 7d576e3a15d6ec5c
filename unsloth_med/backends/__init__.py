"""One seam, two backends: `pick_backend("auto" | "unsloth" | "hf")`.

A backend object knows how to load a model and processor, add adapters, build the training collator,
switch between training and inference, and reload an adapter. Evaluation and export talk to models
only through it, so both backends share them. Only `backends/unsloth.py` imports unsloth, lazily:
`import unsloth` refuses to run on a machine without a GPU.
"""
from __future__ import annotations

import importlib.util

from ..errors import BackendError


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def resolve_backend_name(name: str) -> str:
    if name == "auto":
        return "unsloth" if cuda_available() and unsloth_installed() else "hf"
    if name == "unsloth":
        if not cuda_available():
            raise BackendError(
                "--backend unsloth needs an NVIDIA GPU with CUDA, and none is visible here. "
                "Use --backend hf (transformers + peft; runs on CPU) or --backend auto."
            )
        if not unsloth_installed():
            raise BackendError("--backend unsloth needs the unsloth package: pip install 'unsloth-med[gpu]'. "
                               "Or use --backend hf.")
        return name
    if name == "hf":
        return name
    raise BackendError(f"Unknown backend '{name}'. Choose auto, unsloth or hf.")


def pick_backend(name: str = "auto"):
    resolved = resolve_backend_name(name)
    if resolved == "unsloth":
        from .unsloth import UnslothBackend

        return UnslothBackend()
    from .hf import HFBackend

    return HFBackend()
