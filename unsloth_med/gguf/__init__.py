"""GGUF export for llama.cpp and Ollama (text GGUF + mmproj GGUF, verified by running them in llama.cpp).

- `llamacpp.py`: the pinned llama.cpp (sources, converter, ctypes bindings, a cached CPU build).
- `convert.py`: the converter run with our fixes (subclasses of its classes; a subprocess).
- `run_llama.py`: the GGUF + mmproj run through llama.cpp's C API (a subprocess).
- `export.py`: `export_gguf(run_dir, quant=...)`, the verification, the model card lines.
"""
from __future__ import annotations


def export_gguf(run_dir, *, out=None, quant: str = "f16", threads: int = 2) -> dict:
    from .export import export_gguf as run

    return run(run_dir, out=out, quant=quant, threads=threads)
