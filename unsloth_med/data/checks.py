"""Dataset checks that need no model: train/test leakage by near-duplicate images, and `check_data`.

Leakage: a test image that is a copy of a training image (renamed, re-encoded, lightly recompressed)
measures memory, not skill. Each image is reduced to a 64x64 grayscale thumbnail and compared with
every training thumbnail by mean absolute pixel difference (MAD, 0..1); a test image whose closest
training image is under `threshold` (default 2/255, i.e. two grey levels on average) is leaked.

Why not a perceptual hash: a 64-bit difference hash only keeps the sign of neighbouring-pixel
differences, and on X-rays (dark background, one bright bone) unrelated images share a hash at
distance 0. Here every reported pair is confirmed by the pixel difference itself. To stay fast, 16x16
block means are compared first: their MAD is a lower bound of the 64x64 MAD (triangle inequality on
each block), so pruning with it never drops a true pair; only the survivors get the exact comparison.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import ImageError
from .images import load_image, raw_image_column

log = logging.getLogger(__name__)

THUMB = 64  # thumbnail side for the exact comparison
COARSE = 16  # block-mean side for the lower-bound prefilter
DEFAULT_THRESHOLD = 2 / 255


# ----------------------------------------------------------------------------- thumbnails
def thumbnail(source: Any) -> np.ndarray:
    """A 64x64 grayscale thumbnail in [0, 1] (float32) of anything `load_image` accepts.

    The full image is decoded (no reduced-scale JPEG decoding: on copies that differ by one pixel
    of width it moves the difference by more than half a grey level) and box-filtered down.
    """
    small = load_image(source).convert("L").resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def thumbnails(sources: Sequence[Any], *, workers: int | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Thumbnails as an [n, 64*64] array (rows of unreadable images are NaN) and the error per image."""
    def one(source):
        try:
            return thumbnail(source).reshape(-1), None
        except ImageError as exc:
            return None, str(exc)
        except Exception as exc:  # PIL raises many types for broken files; report, never crash the check
            return None, f"{_name(source, 0)}: {type(exc).__name__}: {exc}"

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, sources))
    out = np.full((len(sources), THUMB * THUMB), np.nan, dtype=np.float32)
    errors: list[str | None] = []
    for i, (arr, err) in enumerate(results):
        if arr is not None:
            out[i] = arr
        errors.append(err)
    return out, errors


def _coarse(thumbs: np.ndarray) -> np.ndarray:
    k = THUMB // COARSE
    return thumbs.reshape(-1, COARSE, k, COARSE, k).mean(axis=(2, 4)).reshape(len(thumbs), -1)


def _name(source: Any, index: int, prefix: str = "") -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return f"{prefix}[{index}]"


# ----------------------------------------------------------------------------- leakage
def closest_pairs(train: np.ndarray, test: np.ndarray, threshold: float, *, chunk: int = 64) -> list[tuple[int, int, float]]:
    """(test index, closest train index, MAD) for every test thumbnail within `threshold` of a training one."""
    train_ok = ~np.isnan(train).any(axis=1)
    test_ok = ~np.isnan(test).any(axis=1)
    train_idx = np.flatnonzero(train_ok)
    if not len(train_idx):
        return []
    train_v = train[train_idx]
    train_c = _coarse(train_v)
    pairs = []
    tests = np.flatnonzero(test_ok)
    for start in range(0, len(tests), chunk):
        idx = tests[start:start + chunk]
        lower = np.abs(_coarse(test[idx])[:, None, :] - train_c[None, :, :]).mean(axis=2)  # <= true MAD
        for row, i in enumerate(idx):
            candidates = np.flatnonzero(lower[row] < threshold + 1e-7)
            if not len(candidates):
                continue
            mads = np.abs(train_v[candidates] - test[i]).mean(axis=1)
            best = int(np.argmin(mads))
            if mads[best] < threshold:
                pairs.append((int(i), int(train_idx[candidates[best]]), float(mads[best])))
    return pairs


def find_leaked_test_images(train_paths: Sequence[Any], test_paths: Sequence[Any], *,
                            threshold: float = DEFAULT_THRESHOLD, train_ids: Sequence[str] | None = None,
                            test_ids: Sequence[str] | None = None, workers: int | None = None) -> list[dict]:
    """Test images that are near-identical copies of a training image.

    Items are file paths (or anything `load_image` accepts). Returns one entry per leaked test image, in
    test order: {"test", "train", "mad"} (paths, or ids/indices for in-memory images; `mad` on a 0..1
    scale, so 2/255 is two grey levels), plus "test_id"/"train_id" when ids are given. Unreadable images
    are skipped (the validation step reports them).
    """
    train_thumbs, train_errors = thumbnails(train_paths, workers=workers)
    test_thumbs, test_errors = thumbnails(test_paths, workers=workers)
    bad = sum(e is not None for e in train_errors) + sum(e is not None for e in test_errors)
    if bad:
        log.warning("leakage check: %d unreadable images skipped", bad)
    leaks = []
    for i, j, mad in closest_pairs(train_thumbs, test_thumbs, threshold):
        entry = {"test": _name(test_paths[i], i, "test"), "train": _name(train_paths[j], j, "train"), "mad": round(mad, 6)}
        if test_ids is not None:
            entry["test_id"] = str(test_ids[i])
        if train_ids is not None:
            entry["train_id"] = str(train_ids[j])
        leaks.append(entry)
    return leaks


def _column(dataset, name: str) -> list:
    if hasattr(dataset, "column_names"):
        return list(dataset[name]) if name in dataset.column_names else [None] * len(dataset)
    return [row.get(name) for row in dataset]


def leaked_test_images(splits, *, threshold: float = DEFAULT_THRESHOLD, workers: int | None = None) -> list[dict]:
    """Leakage between splits["train"] and splits["test"] (rows {image, target, id}); entries also carry
    the two labels, since a copy filed under different classes is worth knowing about."""
    train, test = splits["train"], splits["test"]
    train_targets, test_targets = _column(train, "target"), _column(test, "target")
    train_ids, test_ids = [str(x) for x in _column(train, "id")], [str(x) for x in _column(test, "id")]
    leaks = find_leaked_test_images(raw_image_column(train), raw_image_column(test), threshold=threshold,
                                    train_ids=train_ids, test_ids=test_ids, workers=workers)
    train_pos = {tid: k for k, tid in enumerate(train_ids)}
    test_pos = {tid: k for k, tid in enumerate(test_ids)}
    for entry in leaks:
        entry["test_label"] = test_targets[test_pos[entry["test_id"]]]
        entry["train_label"] = train_targets[train_pos[entry["train_id"]]]
    return leaks


def drop_leaked(test_dataset, leaks: Sequence[dict]):
    """The test split without the leaked images (matched by id); works on a datasets.Dataset or a list of rows."""
    gone = {str(entry.get("test_id", entry.get("test"))) for entry in leaks}
    ids = [str(x) for x in _column(test_dataset, "id")]
    images = [str(x) if isinstance(x, (str, os.PathLike)) else None for x in raw_image_column(test_dataset)]
    keep = [k for k, (tid, img) in enumerate(zip(ids, images)) if tid not in gone and img not in gone]
    if hasattr(test_dataset, "select"):
        return test_dataset.select(keep)
    return [test_dataset[k] for k in keep]


# ----------------------------------------------------------------------------- check-data
def check_data(recipe, data_dir: str | None = None, *, threshold: float = DEFAULT_THRESHOLD,
               image_size: int | None = None, out_dir: str | Path | None = None) -> dict:
    """Everything `unsloth-med check-data` reports: sizes, class counts, unusable images, leaked test images.

    `recipe` is a Recipe (the command resolves names: data/ never imports recipes). Nothing is dropped here;
    the summary lists what a run would skip.
    """
    from .sources import load_recipe_data
    from .summary import summarize
    from .validate import validate_splits

    image_size = image_size or recipe.image_size
    splits = load_recipe_data(recipe, data_dir)
    clean, skipped = validate_splits(dict(splits), image_size=image_size, max_bad_fraction=1.0)
    summary = summarize(recipe, clean, Path(out_dir) if out_dir else None, image_size=image_size)
    summary["skipped_images"] = skipped
    leaks = leaked_test_images(clean, threshold=threshold)
    summary["leak_threshold"] = threshold
    summary["leaked_test_images"] = leaks
    summary["leaked_count"] = len(leaks)
    return summary
