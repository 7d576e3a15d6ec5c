"""Run a text GGUF + mmproj GGUF through llama.cpp's C API (ctypes) and write what the export check compares.

Run in a subprocess (a crash inside llama.cpp must not take the export down):
`python -m unsloth_med.gguf.run_llama JOB.json OUT.npz`. The ctypes bindings are llama-cpp-python's own
`llama_cpp.llama_cpp` / `llama_cpp.mtmd_cpp` modules from the same sdist as the llama.cpp build (so the struct
layouts match it); they are loaded without the package's `__init__` (which imports its high-level API).

JOB.json: {"model", "mmproj", "lib_dir", "bindings", "threads", "image_min_tokens", "image_max_tokens",
"rows": [{"image": PNG, "prompt": text with llama.cpp's media marker, "answers": [[token ids], ...]}]}.
OUT.npz: last_logits [rows, vocab] float32 (the prompt's last position), label_logprobs [rows, answers]
float64 (summed log-probabilities of each answer's tokens after the prompt), prompt_tokens [rows].
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image


def _bindings(bindings: str, lib_dir: str):
    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
    os.environ["MTMD_CPP_LIB"] = lib_dir
    package = types.ModuleType("llama_cpp")
    package.__path__ = [str(Path(bindings) / "llama_cpp")]
    sys.modules["llama_cpp"] = package
    return importlib.import_module("llama_cpp.llama_cpp"), importlib.import_module("llama_cpp.mtmd_cpp")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max()
    return logits - top - np.log(np.exp(logits - top).sum())


class Runner:
    def __init__(self, job: dict):
        self.ll, self.mtmd = _bindings(job["bindings"], job["lib_dir"])
        ll, mtmd = self.ll, self.mtmd
        ll.llama_backend_init()
        model_params = ll.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = ll.llama_model_load_from_file(job["model"].encode(), model_params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {job['model']}")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        ctx_params = ll.llama_context_default_params()
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = job.get("n_ctx", 4096)
        ctx_params.n_threads = ctx_params.n_threads_batch = job.get("threads", 2)
        self.ctx = ll.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        mparams = mtmd.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.print_timings = False
        mparams.warmup = False
        mparams.n_threads = job.get("threads", 2)
        for key in ("image_min_tokens", "image_max_tokens"):
            if job.get(key):
                setattr(mparams, key, int(job[key]))
        self.mctx = mtmd.mtmd_init_from_file(job["mmproj"].encode(), self.model, mparams)
        if not self.mctx:
            raise SystemExit(f"llama.cpp (mtmd) could not load the mmproj {job['mmproj']}")
        self.batch = ll.llama_batch_init(job.get("n_ctx", 4096), 0, 1)

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _decode(self, tokens: list[int], first_pos: int) -> None:
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, first_pos + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        if self.ll.llama_decode(self.ctx, batch) != 0:
            raise SystemExit("llama_decode failed on the answer tokens")

    def row(self, image_path: str, prompt: str, answers: list[list[int]]) -> tuple[np.ndarray, list[float], int]:
        ll, mtmd = self.ll, self.mtmd
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        rgb = np.ascontiguousarray(np.asarray(Image.open(image_path).convert("RGB")), dtype=np.uint8)
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text(prompt.encode(), len(prompt.encode()), False, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise SystemExit("mtmd_tokenize failed: the prompt's media markers and images do not match")
        n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
        n_past = ll.llama_pos(0)
        if mtmd.mtmd_helper_eval_chunks(self.mctx, self.ctx, chunks, 0, 0, 4096, True, ctypes.byref(n_past)) != 0:
            raise SystemExit("llama.cpp failed to evaluate the prompt (image + text)")
        last = self._logits(-1)
        first = _log_softmax(last)
        scores = []
        for answer in answers:
            total = float(first[answer[0]])
            if len(answer) > 1:
                self._decode(answer[:-1], n_past.value)
                for i, token in enumerate(answer[1:]):
                    total += float(_log_softmax(self._logits(i))[token])
                ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx), 0, n_past.value, -1)
            scores.append(total)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        return last, scores, int(n_tokens)


def main(argv: list[str] | None = None) -> int:
    job_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    job = json.loads(Path(job_path).read_text())
    runner = Runner(job)
    last, scores, counts = [], [], []
    for row in job["rows"]:
        logits, score, n = runner.row(row["image"], row["prompt"], row.get("answers") or [])
        last.append(logits)
        scores.append(score)
        counts.append(n)
    np.savez(out_path, last_logits=np.stack(last).astype(np.float32), prompt_tokens=np.array(counts),
             label_logprobs=np.array(scores, dtype=np.float64).reshape(len(counts), -1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
