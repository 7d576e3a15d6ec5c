"""Decode and size every image once, before training, instead of once per batch per epoch.

`prepare_images(dataset, fit)` writes each image, already sized by the run's `ImageFit`, as a PNG
into the cache (keyed by the source file and the fit, so a second run, or the next epoch, decodes
nothing but a small PNG) and returns the dataset with `image` pointing at those files, a `length`
column (the sample's approximate token count, for transformers' LengthGroupedSampler) and an
`image_shape` column ("WxH"), which `train_sampling_strategy: group_by_length` uses to make every
micro-batch one image shape (data/batching.py).

The collators still apply the same fit to what they load; on a prepared image it changes nothing,
so a prepared and an unprepared run feed the model identical pixels.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .images import ImageFit, load_image
from .samples import image_refs

log = logging.getLogger(__name__)

# The answer's share of `length`: characters / 4 (roughly tokens), rounded up to a multiple of 32. The
# rounding matters: class names differ by a few characters, and grouping by those would put the same
# classes together in a batch. Rounded, all short answers tie, and ties keep the sampler's random order.
CHARS_PER_TOKEN = 4
TEXT_BIN = 32


def sample_length(fit: ImageFit, size: tuple[int, int], answer: Any) -> int:
    """A ranking key for length grouping: image tokens + the answer's tokens, binned (not an exact count)."""
    text = -(-len(str(answer or "")) // CHARS_PER_TOKEN)
    return fit.image_tokens(size) + TEXT_BIN * max(1, -(-text // TEXT_BIN))


def file_identity(path: str | os.PathLike) -> str:
    """A file's path, size and modification time: a changed file gets a new identity (OSError if it is missing)."""
    stat = os.stat(path)
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _source_key(source: Any) -> str:
    """Identity of an image source: path + size + mtime for files (a changed file is re-prepared), else its bytes."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (str, os.PathLike)):
        return "file:" + file_identity(source)
    if isinstance(source, (bytes, bytearray)):
        return "bytes:" + hashlib.sha1(source).hexdigest()
    if hasattr(source, "tobytes"):  # a PIL image
        return f"pil:{source.mode}:{source.size}:" + hashlib.sha1(source.tobytes()).hexdigest()
    return "other:" + repr(source)


def _fit_key(fit: ImageFit) -> str:
    return f"v1:{fit.max_side}:{fit.factor}:{int(fit.buckets)}"


def prepared_path(cache_root: Path, source: Any, fit: ImageFit) -> Path:
    digest = hashlib.sha1(f"{_fit_key(fit)}|{_source_key(source)}".encode()).hexdigest()
    return cache_root / digest[:2] / f"{digest}.png"


def _prepare_one(source: Any, fit: ImageFit, cache_root: Path) -> tuple[str, tuple[int, int], bool]:
    out = prepared_path(cache_root, source, fit)
    if out.is_file():
        from PIL import Image

        with Image.open(out) as img:
            return str(out), img.size, True
    image = load_image(source, fit)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast to write, lossless
    # A temporary name of its own (not just the pid: threads of one process share it), then an atomic rename:
    # a killed run never leaves a half-written cached image, and two writers of one image never collide.
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(out), image.size, False


def prepare_images(dataset, fit: ImageFit, cache_root: str | Path | None = None, *, num_proc: int | None = None,
                   workers: int | None = None):
    """`dataset` (a datasets.Dataset of {image, target, ...} rows) with every image decoded, sized and cached.

    Returns (prepared dataset, stats). The images must already be validated (`data.validate`): a bad one
    here raises ImageError naming it.
    """
    import datasets

    if cache_root is None:
        from .sources import cache_dir

        cache_root = cache_dir() / "prepared-images"
    cache_root = Path(cache_root)
    t0 = time.perf_counter()
    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_list(dataset)
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))

    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def prepare(batch: dict) -> dict:
        # Every image of a row: `image`, then a multi-image sample's `more_images` (prepared too; its image_shape
        # is "WxH+WxH", its length and image_tokens count every image). An image that several rows share (VQA: many
        # questions per image) is prepared once per batch.
        more = batch["more_images"] if "more_images" in batch else [None] * len(batch["image"])
        rows = [image_refs({"image": first, "more_images": extra}) for first, extra in zip(batch["image"], more)]
        keys = [[_source_key(source) for source in images] for images in rows]
        distinct: dict[str, Any] = {}
        for row_keys, images in zip(keys, rows):
            for key, source in zip(row_keys, images):
                distinct.setdefault(key, source)
        # Threads: PIL decodes, resizes and encodes outside the GIL.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = dict(zip(distinct, pool.map(lambda source: _prepare_one(source, fit, cache_root),
                                                  distinct.values())))
        done = [[results[key] for key in row_keys] for row_keys in keys]
        answers = batch.get("target") or [""] * len(done)
        out = {"_prepared": [row[0][0] for row in done],
               "length": [sample_length(fit, row[0][1], answer) + sum(fit.image_tokens(size) for _, size, _ in row[1:])
                          for row, answer in zip(done, answers)],
               "image_tokens": [sum(fit.image_tokens(size) for _, size, _ in row) for row in done],
               "_from_cache": [[hit for _, _, hit in row] for row in done],
               "image_shape": ["+".join(f"{w}x{h}" for _, (w, h), _ in row) for row in done]}
        if "more_images" in batch:
            out["more_images"] = [json.dumps([path for path, _, _ in row[1:]]) for row in done]
        return out

    prepared = dataset.map(prepare, batched=True, batch_size=256, num_proc=num_proc, desc="Preparing images",
                           load_from_cache_file=False)
    # A new column, renamed: `datasets` would keep the source's Image feature on an updated `image` column.
    prepared = prepared.remove_columns("image").rename_column("_prepared", "image")
    # Counted by image, not by row: a row may hold two views, and many questions may show one image.
    found: dict[str, bool] = {}  # prepared file -> whether it was in the cache (its first row's say)
    more = prepared["more_images"][:] if "more_images" in prepared.column_names else [None] * len(prepared)
    for first, extra, hits in zip(prepared["image"][:], more, prepared["_from_cache"][:]):
        for path, hit in zip([first, *json.loads(extra or "[]")], hits):
            found.setdefault(path, hit)
    shapes = set(prepared["image_shape"][:])
    prepared = prepared.remove_columns("_from_cache")
    stats = {"images": len(found), "rows": len(prepared), "from_cache": sum(found.values()),
             "distinct_shapes": len(shapes), "seconds": round(time.perf_counter() - t0, 2),
             "image_fit": {"max_side": fit.max_side, "factor": fit.factor, "buckets": fit.buckets},
             "cache": str(cache_root)}
    log.info("prepared %d images (%d from cache) for %d rows in %.1f s", stats["images"], stats["from_cache"],
             stats["rows"], stats["seconds"])
    return prepared, stats


def check_image_tokens(dataset, max_seq_length: int, fit: ImageFit) -> None:
    """Refuse, before training starts, samples whose image tokens alone exceed max_seq_length.

    Image tokens are a lower bound of a sample's length (text and special tokens come on top), so this
    never refuses a sample that fits; the collators still check every exact length.
    """
    from ..errors import SampleTooLongError

    if "image_tokens" not in getattr(dataset, "column_names", []):
        return
    counts = dataset["image_tokens"][:]  # one batch, not a lazy column read row by row
    over = [i for i, n in enumerate(counts) if n > max_seq_length]
    if over:
        ids = dataset.select(over[:3])["id"]
        raise SampleTooLongError(
            f"{len(over)} of {len(counts)} training images need more than max_seq_length={max_seq_length} image tokens "
            f"alone (up to {max(counts[i] for i in over)}; e.g. {', '.join(map(str, ids))}). Lower --image_size (now "
            f"{fit.max_side}) or raise --max_seq_length."
        )


def prepare_image(source: Any, fit: ImageFit, cache_root: str | Path | None = None) -> tuple[str, tuple[int, int]]:
    """One image decoded, sized and cached (the lazy path, data/lazy.py): (prepared PNG's path, its size).
    Raises ImageError naming the file when it cannot be decoded."""
    if cache_root is None:
        from .sources import cache_dir

        cache_root = cache_dir() / "prepared-images"
    path, size, _ = _prepare_one(source, fit, Path(cache_root))
    return path, size
