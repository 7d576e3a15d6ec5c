"""Check every image before any model loads, so a bad file costs seconds, not a crashed run at step 800.

Each image is decoded once (threads: PIL decodes outside the GIL) with the same `load_image` the
trainer uses. Every image of a multi-image sample is checked; an image that several rows share (VQA:
many questions per image) is decoded once. A row with an unusable image is skipped, counted, and listed
in <run>/skipped_images.json; when more than `max_bad_fraction` of a split is unusable the run stops
before training with the list.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DataError, ImageError
from .check_cache import remembered
from .dicom import multiframe_policy
from .images import load_image, raw_image_chunks

log = logging.getLogger(__name__)


def _problem(source, image_size) -> str | None:
    try:
        load_image(source, image_size)
    except ImageError as exc:
        return str(exc)
    return None


def _key(source, row: int, position: int) -> str:
    return f"file:{source}" if isinstance(source, (str, os.PathLike)) else f"row:{row}:{position}"


def each_image_once(rows: list[list], check, workers: int | None = None, remember: str | None = None, *,
                    offset: int = 0, done: dict | None = None) -> list[list]:
    """check(source) for every image of every row, in the rows' shape; called once per distinct file (bytes and
    in-memory images: once per row and position), in threads (PIL reads and decodes outside the GIL).

    `remember` (a name for the check and its settings): a file found usable (check returned None) is not checked
    again by a later run while its path, size and modification time stay the same (data/check_cache.py).
    A split read in chunks (images.raw_image_chunks) passes each chunk's first row (`offset`) and one `done` dict
    for all its chunks: a file an earlier chunk checked is not checked again."""
    done = {} if done is None else done
    keys = [[_key(source, k, j) for j, source in enumerate(images)] for k, images in enumerate(rows, offset)]
    distinct: dict[str, object] = {}
    for row_keys, images in zip(keys, rows):
        for key, source in zip(row_keys, images):
            if key not in done:
                distinct.setdefault(key, source)
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        run = lambda sources: list(pool.map(check, sources))  # noqa: E731
        if remember:
            results = remembered(remember, list(distinct.values()), run,
                                 encode=lambda problem: b"" if problem is None else None, decode=lambda _: None)
        else:
            results = run(list(distinct.values()))
        found = dict(zip(distinct, results))
    # Files only: a row's own key (bytes, in-memory images) never comes again.
    done.update((key, result) for key, result in found.items() if key.startswith("file:"))
    return [[found[key] if key in found else done[key] for key in row_keys] for row_keys in keys]


def validate_split(dataset, split: str, *, image_size: int | None, max_bad_fraction: float,
                   workers: int | None = None):
    """(dataset without unusable rows, list of skipped rows {id, image, reason}). Images embedded as bytes are read
    and checked a chunk of rows at a time (images.raw_image_chunks)."""
    if not len(dataset):
        return dataset, []
    ids = dataset["id"][:]  # one read of the column
    remember = f"usable:v1:{image_size}:{multiframe_policy()}"  # the policy decides too
    skipped, keep, done = [], [], {}
    for offset, rows in raw_image_chunks(dataset):
        found = each_image_once(rows, lambda source: _problem(source, image_size), workers, remember=remember,
                                offset=offset, done=done)
        for k, (images, problems) in enumerate(zip(rows, found), offset):
            j, reason = next(((j, p) for j, p in enumerate(problems) if p), (0, None))
            if not reason:
                keep.append(k)
                continue
            source = images[j]
            skipped.append({"split": split, "id": ids[k], "image": str(source) if isinstance(source, str) else ids[k],
                            "reason": which_image(j, len(images)) + reason})
    check_bad_fraction(skipped, len(dataset), split, max_bad_fraction)
    return (dataset.select(keep) if skipped else dataset), skipped


def which_image(position: int, count: int) -> str:
    """"image 2 of 3: " before a multi-image sample's problem, "" for a single image."""
    return f"image {position + 1} of {count}: " if count > 1 else ""


def check_bad_fraction(skipped: list[dict], total: int, split: str, max_bad_fraction: float) -> None:
    """Warn about the skipped rows of a split; stop (DataError, with the first problems) above max_bad_fraction."""
    if skipped:
        log.warning("%s: skipping %d of %d images that cannot be used", split, len(skipped), total)
    if total and len(skipped) / total > max_bad_fraction:
        examples = "\n  ".join(f"{s['id']}: {s['reason']}" for s in skipped[:5])
        raise DataError(
            f"{len(skipped)} of {total} {split} images ({len(skipped) / total:.1%}) cannot be used, more "
            f"than --max_bad_fraction={max_bad_fraction:.0%}. First problems:\n  {examples}\n"
            "Fix or remove those files, or raise --max_bad_fraction to train without them."
        )


def validate_splits(splits: dict, *, image_size: int | None, max_bad_fraction: float, run_dir: Path | None = None,
                    also_skipped=()):
    """Validate every split; writes skipped_images.json into run_dir (always, possibly empty), listing
    `also_skipped` (rows another check skipped, data/lazy.py) too."""
    clean, skipped_all = {}, list(also_skipped)
    for name, dataset in splits.items():
        clean[name], skipped = validate_split(dataset, name, image_size=image_size, max_bad_fraction=max_bad_fraction)
        skipped_all += skipped
    if run_dir is not None:
        Path(run_dir, "skipped_images.json").write_text(json.dumps(skipped_all, indent=1))
    return clean, skipped_all
