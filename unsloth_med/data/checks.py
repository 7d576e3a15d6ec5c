"""Dataset checks that need no model: train/test leakage by near-duplicate images, and `check_data`.

Leakage: a test image that is a copy of a training image (renamed, re-encoded, lightly recompressed)
measures memory, not skill. Each image is reduced to a 64x64 grayscale thumbnail and compared with
training thumbnails by mean absolute pixel difference (MAD, 0..1); a test image whose closest
training image is under `threshold` (default 2/255, i.e. two grey levels on average) is leaked.

Why not a perceptual hash: a 64-bit difference hash only keeps the sign of neighbouring-pixel
differences, and on X-rays (dark background, one bright bone) unrelated images share a hash at
distance 0. Here every reported pair is confirmed by the pixel difference itself.

At scale (100,000 training images) the search is exact and near-linear, and memory holds the test
thumbnails only: the training thumbnails are streamed, chunk by chunk, past an index of the test set.
The index is a k-d tree over each test thumbnail's 4x4 block means (16 numbers). The L1 distance of two
images' block means, divided by 16, is a lower bound of their MAD (the mean of a block's differences is
at most the mean of their absolute values), so a radius query of 16 x threshold returns every pair that
can be under the threshold, and never drops a true one. Only those candidates get the exact comparison,
in integers (sum of absolute differences of the 8-bit thumbnails). Ties keep the first training image,
as a scan in training order would.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import ImageError
from .check_cache import remembered
from .images import load_image, raw_image_chunks
from .splits import image_key

log = logging.getLogger(__name__)

THUMB = 64  # thumbnail side for the exact comparison
BLOCKS = 4  # block means per side for the index (16 numbers per image)
DEFAULT_THRESHOLD = 2 / 255
TRAIN_CHUNK = 2048  # training thumbnails in memory at a time (8 MiB)


# ----------------------------------------------------------------------------- thumbnails
def thumbnail(source: Any) -> np.ndarray:
    """A 64x64 grayscale thumbnail (uint8) of anything `load_image` accepts.

    The full image is decoded (no reduced-scale JPEG decoding: on copies that differ by one pixel
    of width it moves the difference by more than half a grey level) and box-filtered down.
    """
    small = load_image(source).convert("L").resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def _kept_thumbnail(kept: bytes) -> tuple[np.ndarray, None]:
    if len(kept) != THUMB * THUMB:
        raise ValueError(f"a kept thumbnail of {len(kept)} bytes")
    return np.frombuffer(kept, dtype=np.uint8), None


def thumbnails(sources: Sequence[Any], *,
               workers: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Thumbnails as a uint8 [n, 64*64] array, a mask of the readable ones, and the error per image."""
    def one(source):
        try:
            return thumbnail(source).reshape(-1), None
        except ImageError as exc:
            return None, str(exc)
        except Exception as exc:  # PIL raises many types for broken files; report, never crash the check
            return None, f"{_name(source, 0)}: {type(exc).__name__}: {exc}"

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # a file's thumbnail is made once, not every run
        results = remembered(f"thumbnail:v1:{THUMB}", sources, lambda todo: list(pool.map(one, todo)),
                             encode=lambda r: r[0].tobytes() if r[0] is not None else None,
                             decode=_kept_thumbnail)
    out = np.zeros((len(sources), THUMB * THUMB), dtype=np.uint8)
    ok = np.zeros(len(sources), dtype=bool)
    for i, (arr, _) in enumerate(results):
        if arr is not None:
            out[i], ok[i] = arr, True
    return out, ok, [err for _, err in results]


def _streamed_thumbnails(sources: Sequence[Any], workers: int | None,
                         chunk: int = TRAIN_CHUNK) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """(offset, thumbnails, readable mask, unreadable count) per chunk of `sources`, one chunk in memory at a time."""
    for start in range(0, len(sources), chunk):
        thumbs, ok, errors = thumbnails(sources[start:start + chunk], workers=workers)
        yield start, thumbs, ok, sum(e is not None for e in errors)


def _block_means(thumbs: np.ndarray) -> np.ndarray:
    k = THUMB // BLOCKS
    sums = thumbs.reshape(-1, BLOCKS, k, BLOCKS, k).sum(axis=(2, 4), dtype=np.int32).reshape(len(thumbs), -1)
    return sums / (k * k * 255.0)


def _name(source: Any, index: int, prefix: str = "") -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return f"{prefix}[{index}]"


# ----------------------------------------------------------------------------- leakage
class LeakSearch:
    """Exact nearest training thumbnail under `threshold` for every test thumbnail, fed training chunks in order."""

    def __init__(self, test: np.ndarray, test_ok: np.ndarray, threshold: float):
        from scipy.spatial import cKDTree

        self.test, self.test_ids = test, np.flatnonzero(test_ok)
        self.tree = cKDTree(_block_means(test[self.test_ids])) if len(self.test_ids) else None
        # Integer sums of absolute differences: a pair is leaked when its sum is below this (MAD < threshold).
        self.limit = threshold * THUMB * THUMB * 255
        self.radius = BLOCKS * BLOCKS * threshold * (1 + 1e-9) + 1e-12  # L1 on block means: <= 16 x MAD
        self.best_sum = np.full(len(test), np.inf)
        self.best_train = np.full(len(test), -1, dtype=np.int64)
        self.candidates = 0

    def add(self, offset: int, train: np.ndarray, train_ok: np.ndarray) -> None:
        rows = np.flatnonzero(train_ok)
        if self.tree is None or not len(rows):
            return
        hits = self.tree.query_ball_point(_block_means(train[rows]), r=self.radius, p=1)
        lengths = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
        if not lengths.sum():
            return
        train_rows = np.repeat(rows, lengths)
        test_rows = self.test_ids[np.concatenate([np.asarray(h, dtype=np.int64) for h in hits if h])]
        self.candidates += len(train_rows)
        for s in range(0, len(train_rows), 4096):  # 4096 pairs x 4096 pixels x 2 bytes: 32 MiB at a time
            a, b = train_rows[s:s + 4096], test_rows[s:s + 4096]
            sums = np.abs(train[a].astype(np.int16) - self.test[b].astype(np.int16)).sum(axis=1, dtype=np.int64)
            close = np.flatnonzero(sums < self.limit)  # rare: the near-copies themselves
            for j, i, total in zip(a[close], b[close], sums[close]):  # training order: the first of equals wins
                if total < self.best_sum[i]:
                    self.best_sum[i], self.best_train[i] = total, offset + j

    def pairs(self) -> list[tuple[int, int, float]]:
        found = np.flatnonzero(self.best_train >= 0)
        return [(int(i), int(self.best_train[i]), float(self.best_sum[i] / (THUMB * THUMB * 255))) for i in found]


def find_leaked_test_images(train_paths: Sequence[Any], test_paths: Sequence[Any], *,
                            threshold: float = DEFAULT_THRESHOLD, train_ids: Sequence[str] | None = None,
                            test_ids: Sequence[str] | None = None, workers: int | None = None) -> list[dict]:
    """Test images that are near-identical copies of a training image.

    Items are file paths (or anything `load_image` accepts). Returns one entry per leaked test image, in
    test order: {"test", "train", "mad"} (paths, or ids/indices for in-memory images; `mad` on a 0..1
    scale, so 2/255 is two grey levels), plus "test_id"/"train_id" when ids are given. Unreadable images
    are skipped (the validation step reports them).
    """
    leaks = []
    for i, j, entry in _leak_search([train_paths], [test_paths], threshold=threshold, workers=workers):
        if test_ids is not None:
            entry["test_id"] = str(test_ids[i])
        if train_ids is not None:
            entry["train_id"] = str(train_ids[j])
        leaks.append(entry)
    return leaks


def _leak_search(train_chunks: Iterable[Sequence[Any]], test_chunks: Iterable[Sequence[Any]], *, threshold: float,
                 workers: int | None) -> list[tuple[int, int, dict]]:
    """find_leaked_test_images over images given chunk by chunk, in order (a split whose images are embedded as
    bytes is read a chunk of rows at a time): (test image, train image, {"test", "train", "mad"}) per leaked test
    image, in test order, the images numbered across chunks."""
    thumbs, oks, test_names, bad = [], [], [], 0
    for sources in test_chunks:
        chunk_thumbs, chunk_ok, errors = thumbnails(sources, workers=workers)
        thumbs.append(chunk_thumbs)
        oks.append(chunk_ok)
        bad += sum(e is not None for e in errors)
        first = len(test_names)
        test_names += [_name(source, first + i, "test") for i, source in enumerate(sources)]
    if len(thumbs) != 1:  # none (an empty split read in chunks), or several chunks
        thumbs, oks = [np.zeros((0, THUMB * THUMB), dtype=np.uint8), *thumbs], [np.zeros(0, dtype=bool), *oks]
    test_thumbs, test_ok = np.concatenate(thumbs), np.concatenate(oks)
    search = LeakSearch(test_thumbs, test_ok, threshold)
    train_names: list[str] = []
    for sources in train_chunks:
        first = len(train_names)
        if test_ok.any():
            for offset, train_thumbs, train_ok, unreadable in _streamed_thumbnails(sources, workers):
                search.add(first + offset, train_thumbs, train_ok)
                bad += unreadable
        train_names += [_name(source, first + i, "train") for i, source in enumerate(sources)]
    if bad:
        log.warning("leakage check: %d unreadable images skipped", bad)
    log.info("leakage check: %d train x %d test images, %d candidate pairs compared exactly",
             len(train_names), len(test_names), search.candidates)
    return [(i, j, {"test": test_names[i], "train": train_names[j], "mad": round(mad, 6)})
            for i, j, mad in search.pairs()]


def _column(dataset, name: str) -> list:
    if hasattr(dataset, "column_names"):
        return list(dataset[name]) if name in dataset.column_names else [None] * len(dataset)
    return [row.get(name) for row in dataset]


def _flat_images(dataset, owners: list[int]) -> Iterator[list]:
    """Every image of every row (a multi-image sample's `more_images` too), a chunk of rows at a time
    (images.raw_image_chunks); the row each one belongs to is appended to `owners` as its chunk is read."""
    for offset, rows in raw_image_chunks(dataset):
        images = []
        for k, row_images in enumerate(rows, offset):
            images += row_images
            owners += [k] * len(row_images)
        yield images


def leaked_test_images(splits, *, threshold: float = DEFAULT_THRESHOLD, workers: int | None = None) -> list[dict]:
    """Leakage between splits["train"] and splits["test"] (rows {image, target, id}); entries also carry
    the two labels, since a copy filed under different classes is worth knowing about. Every image of a
    multi-image row is compared; an entry's ids are those of the rows holding the two images. Images embedded as
    bytes are read a chunk of rows at a time: only the thumbnails of the test split are kept."""
    train, test = splits["train"], splits["test"]
    train_targets, test_targets = _column(train, "target"), _column(test, "target")
    train_ids, test_ids = [str(x) for x in _column(train, "id")], [str(x) for x in _column(test, "id")]
    train_rows: list[int] = []
    test_rows: list[int] = []
    found = _leak_search(_flat_images(train, train_rows), _flat_images(test, test_rows), threshold=threshold,
                         workers=workers)
    train_pos = {tid: k for k, tid in enumerate(train_ids)}
    test_pos = {tid: k for k, tid in enumerate(test_ids)}
    leaks = []
    for i, j, entry in found:
        entry["test_id"], entry["train_id"] = test_ids[test_rows[i]], train_ids[train_rows[j]]
        entry["test_label"] = test_targets[test_pos[entry["test_id"]]]
        entry["train_label"] = train_targets[train_pos[entry["train_id"]]]
        leaks.append(entry)
    return leaks


def drop_leaked(test_dataset, leaks: Sequence[dict]):
    """The test split without the leaked images (matched by id); works on a datasets.Dataset or a list of rows."""
    gone = {str(entry.get("test_id", entry.get("test"))) for entry in leaks}
    ids = [str(x) for x in _column(test_dataset, "id")]
    images = [str(x) if isinstance(x, (str, os.PathLike)) else None  # only paths are needed: bytes read in chunks
              for _, chunk in raw_image_chunks(test_dataset, lists=False) for x in chunk]
    keep = [k for k, (tid, img) in enumerate(zip(ids, images)) if tid not in gone and img not in gone]
    if hasattr(test_dataset, "select"):
        return test_dataset.select(keep)
    return [test_dataset[k] for k in keep]


# ----------------------------------------------------------------------------- check-data
def check_data(recipe, data_dir: str | None = None, *, threshold: float = DEFAULT_THRESHOLD,
               image_size: int | None = None, out_dir: str | Path | None = None, seed: int = 3407,
               split_by: str = "row", test_fraction: float = 0.1) -> dict:
    """Everything `unsloth-med check-data` reports: sizes, class counts, unusable images, leaked test images.

    `recipe` is a Recipe (the command resolves names: data/ never imports recipes). Nothing is dropped here;
    the summary lists what a run would skip. The splits are the ones a run with the same seed, --split_by and
    --test_fraction makes (sources.run_splits).
    """
    from .sources import run_splits
    from .summary import summarize
    from .validate import validate_splits

    image_size = image_size or recipe.image_size
    splits = run_splits(recipe, data_dir, seed=seed, split_by=split_by, test_fraction=test_fraction)
    clean, skipped = validate_splits(dict(splits), image_size=image_size, max_bad_fraction=1.0)
    summary = summarize(recipe, clean, Path(out_dir) if out_dir else None, image_size=image_size)
    summary["skipped_images"] = skipped
    leaks = leaked_test_images(clean, threshold=threshold)
    summary["leak_threshold"] = threshold
    summary["leaked_test_images"] = leaks
    summary["leaked_count"] = len(leaks)
    summary["task"] = recipe.task
    if "test" in clean:  # by image, beside rows: several questions can share one image
        summary["leak_counts"] = leak_counts(clean["test"], leaks)
    return summary


# ----------------------------------------------------------------------------- leak counts (by image, not row)
def leak_counts(test_dataset, leaks: Sequence[dict]) -> dict:
    """Distinct test images and how many of them are leaked, beside the rows they carry (several questions
    can share one image, so rows overstate the leak)."""
    ids = [str(x) for x in _column(test_dataset, "id")]
    images = [x if isinstance(x, (str, os.PathLike)) else _content_key(x, ids[k])  # bytes: hashed chunk by chunk
              for offset, chunk in raw_image_chunks(test_dataset, lists=False) for k, x in enumerate(chunk, offset)]
    groups = _column(test_dataset, "image_group")
    key = [str(g) if g else str(img) for g, img in zip(groups, images)]
    leaked_ids = {str(entry.get("test_id", entry.get("test"))) for entry in leaks}
    leaked_keys = {key[k] for k, tid in enumerate(ids) if tid in leaked_ids or str(images[k]) in leaked_ids}
    return {"test_images": len(set(key)), "leaked_images": len(leaked_keys), "test_rows": len(ids),
            "leaked_rows": sum(1 for k in key if k in leaked_keys)}


def _content_key(image: Any, row_id: str) -> str:
    """An image that is not a path (a HF Image feature's bytes: VQA-RAD stores a copy per question) is one image
    by content, as --split_by image counts it; the row id when it has nothing to hash."""
    try:
        return f"sha256:{image_key(image)}"
    except (OSError, KeyError, TypeError):
        return row_id


def leak_message(counts: dict) -> str:
    """The plain sentence a run prints about leakage, with the way out when the data's split reuses images."""
    text = (f"{counts['leaked_images']} of {counts['test_images']} test images (carrying {counts['leaked_rows']} of "
            f"{counts['test_rows']} test rows) are near-identical copies of training images")
    if counts["test_rows"] > counts["test_images"]:
        text += ("; this data asks several questions per image and its own split reuses images, so test scores "
                 "measure memory: re-split with --split_by image")
    return text
