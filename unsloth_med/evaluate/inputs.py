"""What every evaluation pass feeds the model: prompts cut from the training conversation, images decoded and
sized, both encoded with left padding (on the CPU), prepared ahead in a thread, and moved to the model.

Prompts are the training conversation cut just before the answer, so evaluation sees exactly the text the model
was trained on. `EncodedBatches` keeps what one pass encoded for the next pass over the same split.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..data import samples
from ..data.images import load_image
from ..models import prompting
from ..models.folding import free_memory_bytes

_SENTINEL = "\x00UNSLOTH_MED_ANSWER\x00"


def prompt_text(processor: Any, recipe, row: dict | None = None) -> str:
    """The rendered prompt of a row (its question, its earlier turns) exactly as training renders it, up to
    where the (last) answer starts.

    It is cut from a rendered training conversation rather than taken from `add_generation_prompt`,
    so scoring and generation see the same tokens as the trainer, whatever the template does.
    """
    full = prompting.render(processor, recipe.answered(row, _SENTINEL))
    if _SENTINEL in full:
        return full.split(_SENTINEL, 1)[0]
    return prompting.render(processor, recipe.prompt(example=row), add_generation_prompt=True)


def row_prompts(processor: Any, recipe, rows: Sequence[dict], prompt: str | None = None) -> list[str]:
    """One rendered prompt per row (`prompt`, when given, for all of them)."""
    return [prompt] * len(rows) if prompt is not None else [prompt_text(processor, recipe, row) for row in rows]


def row_images(rows: Sequence[dict], image_size) -> list[list]:
    """The decoded images of each row, in order (decoded in threads on a machine with cores to spare: PIL releases
    the GIL while it decodes)."""
    refs = [samples.image_refs(row) for row in rows]
    flat = [ref for row_refs in refs for ref in row_refs]
    if len(flat) >= 8 and (os.cpu_count() or 1) > 4:
        with ThreadPoolExecutor(max_workers=min(8, len(flat))) as pool:
            decoded = iter(list(pool.map(lambda ref: load_image(ref, image_size), flat)))
    else:
        decoded = iter([load_image(ref, image_size) for ref in flat])
    return [[next(decoded) for _ in row_refs] for row_refs in refs]


def encode_rows(processor: Any, recipe, rows: Sequence[dict], image_size, prompt: str | None = None) -> dict:
    """The prompts of `rows` with their images, tokenized and left-padded (on the CPU), ready for the model."""
    return _encode_prompted(processor, row_prompts(processor, recipe, rows, prompt), rows, image_size)


def _encode_prompted(processor: Any, prompts: Sequence[str], rows: Sequence[dict], image_size) -> dict:
    """Rendered prompts with their rows' images, left-padded: what every evaluation batch is."""
    return prompting.encode(processor, prompts, row_images(rows, image_size), padding_side="left")


class EncodedBatches:
    """The encoded batches of one pass, kept for the next pass over the same rows.

    A run scores its test split before training and again after it: the same prompts and images, encoded the
    same way (training changes the model, not the processor). The pass after reads the batches the pass before
    encoded instead of decoding, sizing and tokenizing every image again, and its first batch is ready at once.
    On the 14B shape the pass after training spent 1.3 s of its threads preparing batches and waited 0.2 s for
    the first (benchmarks/README.md, session 17); a pass after training is about 4 s.

    A batch is found again by what it is made of: the processor, the image size, every row's rendered prompt
    and every image's file (or the hash of its bytes). Rows whose images are not files or bytes (decoded images
    in memory) are encoded each pass. Batches are kept until `limit_bytes`: by default a quarter of the RAM
    available when the store is made, at most 4 GiB (140 X-rays at 512 px are about 0.4 GiB of float32 pixels);
    the batches beyond it are encoded each pass, as without the store. `stats`: batches reused and encoded."""

    def __init__(self, limit_bytes: int | None = None):
        if limit_bytes is None:
            limit_bytes = min(4 << 30, free_memory_bytes(torch.device("cpu")) // 4)
        self.limit_bytes = int(limit_bytes)
        self.kept: dict[tuple, dict] = {}
        self.kept_bytes = 0
        self.stats = {"reused": 0, "encoded": 0}
        self._lock = threading.Lock()  # Prefetch encodes in up to two threads at once

    def encoder(self, processor: Any, recipe, image_size) -> Callable[[Sequence[dict]], dict]:
        """encode_rows(processor, recipe, rows, image_size), read from the store where it holds the batch."""
        def encode(rows: Sequence[dict]) -> dict:
            prompts = row_prompts(processor, recipe, rows)
            key = _batch_key(processor, image_size, prompts, rows)
            with self._lock:
                kept = self.kept.get(key) if key is not None else None
                self.stats["reused" if kept is not None else "encoded"] += 1
            if kept is not None:
                return dict(kept)  # a new dict: a caller may pop from it; the tensors are read, never written
            encoded = _encode_prompted(processor, prompts, rows, image_size)
            size = sum(v.numel() * v.element_size() for v in encoded.values() if isinstance(v, torch.Tensor))
            with self._lock:
                if key is not None and key not in self.kept and self.kept_bytes + size <= self.limit_bytes:
                    self.kept[key] = dict(encoded)
                    self.kept_bytes += size
            return encoded
        return encode


def _batch_key(processor: Any, image_size, prompts: Sequence[str], rows: Sequence[dict]) -> tuple | None:
    images = []
    for row in rows:
        for ref in samples.image_refs(row):
            if isinstance(ref, str):
                images.append(ref)
            elif isinstance(ref, dict) and ref.get("bytes"):
                images.append(hashlib.blake2b(ref["bytes"], digest_size=16).hexdigest())
            elif isinstance(ref, dict) and ref.get("path"):
                images.append(str(ref["path"]))
            else:
                return None
        images.append(None)  # where a row's images end
    return (id(processor), image_size, tuple(prompts), tuple(images))


def encoder(processor: Any, recipe, image_size, store: EncodedBatches | None) -> Callable[[Sequence[dict]], dict]:
    """The function a pass encodes its batches with: through `store` when one is given."""
    if store is not None:
        return store.encoder(processor, recipe, image_size)
    return lambda rows: encode_rows(processor, recipe, rows, image_size)


class Prefetch:
    """`(item, prepare(item))` for each item, the next `ahead` prepared in a background thread while the caller
    works (the GPU computes one batch while the CPU decodes and tokenizes the next). Order is kept. With
    ahead=0 everything runs in the caller's thread (a CPU machine, where a second thread only competes).

    `stats`: seconds spent preparing and seconds the caller waited for a prepared item; a wait close to the
    preparation time means evaluation is bound by the CPU side, not the GPU."""

    def __init__(self, items: Iterable, prepare, ahead: int = 2):
        self.items, self.prepare, self.ahead = items, prepare, ahead
        self.stats = {"prepare_s": 0.0, "waited_s": 0.0, "batches": 0}

    def _timed(self, item):
        started = time.perf_counter()
        try:
            return self.prepare(item)
        finally:
            self.stats["prepare_s"] += time.perf_counter() - started

    def __iter__(self):
        if self.ahead <= 0:
            for item in self.items:
                started = time.perf_counter()
                prepared = self._timed(item)
                self.stats["waited_s"] += time.perf_counter() - started
                self.stats["batches"] += 1
                yield item, prepared
            return
        with ThreadPoolExecutor(max_workers=self.ahead) as pool:
            pending = deque()
            source = iter(self.items)
            for item in source:
                pending.append((item, pool.submit(self._timed, item)))
                if len(pending) > self.ahead:
                    yield self._next(pending)
            while pending:
                yield self._next(pending)

    def _next(self, pending):
        item, future = pending.popleft()
        started = time.perf_counter()
        prepared = future.result()
        self.stats["waited_s"] += time.perf_counter() - started
        self.stats["batches"] += 1
        return item, prepared

    def summary(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.stats.items()}


def prefetch_depth(model) -> int:
    """Batches prepared ahead: 2 when the model runs on a GPU, none on a CPU."""
    device, _ = model_device_dtype(model)
    return 2 if device.type == "cuda" else 0


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    if not isinstance(device, torch.device) or not isinstance(dtype, torch.dtype):
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # quantized weights
    return device, dtype


def to_model(batch, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors onto the model's device; floating inputs (pixels) in the model's dtype. From page-locked memory
    (`pinned`) the copies do not wait for the GPU to finish its earlier work."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)  # cast on the device: the CPU copy stays page-locked
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def pinned(encoded: dict) -> dict:
    """The batch's CPU tensors in page-locked memory, where a GPU is present (else as they are): a pass copies
    them to the GPU while it still scores the batch before (label scoring reads each batch's scores one batch
    late, classify._iter_scored)."""
    if not torch.cuda.is_available():
        return encoded
    return {key: value.pin_memory() if isinstance(value, torch.Tensor) and value.device.type == "cpu" else value
            for key, value in encoded.items()}


def device_tensor(values, device: torch.device, **kw) -> torch.Tensor:
    """torch.tensor(values) on `device`, copied from page-locked memory: a plain torch.tensor(..., device=cuda)
    waits for every kernel already queued, which would stall the pass's look-ahead for a few indices."""
    tensor = torch.tensor(values, **kw)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A CPU copy of a tensor, queued on the GPU now; `result()` waits for that copy only, not for the work
    queued after it. A CPU tensor is its own copy."""

    def __init__(self, tensor: torch.Tensor):
        self.ready = None
        if tensor.device.type != "cuda":
            self.host = tensor
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.device(tensor.device):  # a model on another GPU than the current one
            self.host.copy_(tensor, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record(torch.cuda.current_stream(tensor.device))  # the copy's stream: the tensor's device

    def result(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host


def batches(dataset, batch_size: int) -> Iterator[list[dict]]:
    """Rows of a datasets.Dataset or a list of dicts, `batch_size` at a time (decoded lazily)."""
    n = len(dataset)
    for start in range(0, n, max(1, batch_size)):
        yield [dataset[i] for i in range(start, min(start + batch_size, n))]


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)

class eval_mode:
    """Put the model in eval mode for the block and restore its previous mode after."""

    def __init__(self, model):
        self.model, self.was_training = model, bool(getattr(model, "training", False))

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()
        return False
