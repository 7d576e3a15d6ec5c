"""Large training listings: start training at once, decode and prepare each image when a batch first needs it.

Up front a run normally decodes every image twice, once to validate it (data/validate.py) and once to
size it into the cache (data/prepare.py): seconds for a thousand images, many minutes for 100,000. A
training split with more rows than `--lazy_images_above` (default 20,000) is instead:

- checked up front from image headers only (`scan_split`): the file exists, is not empty, is an image
  of a known format within the pixel limit. PIL reads the size from the header without decoding the
  pixels, which is all that length grouping and same-shape batching need (`length`, `image_tokens`,
  `image_shape`, computed by `ImageFit.output_size` exactly as preparation would). Files failing here
  are skipped and listed like validation's (skipped_images.json, --max_bad_fraction). Every image of a
  multi-image sample (`more_images`) is checked, and a row goes when any of its images fails.
- decoded, sized and written into the preparation cache by the collator, the first time a batch holds
  the image (`LazyImages`; in the data loader's workers when there are any, so it overlaps the step).
  The cache fills as training goes; a second run or epoch reads the small prepared PNGs. An image that
  fails to decode then (a truncated file whose header is fine) skips its row: counted, logged as a warning
  and appended to <run>/skipped_in_training.jsonl; the batch goes on without it. More than
  --max_bad_fraction of the images met so far (after the first 100) stops the run with a DataError.

The test split is always validated and prepared in full (evaluation needs every test image); the leakage
check is skipped for a lazy training split (it decodes every image) unless --drop_leaked_test_images asks
for it: run `unsloth-med check-data` on the data instead (about 3 minutes of CPU for 100,000 images).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import DataError, ImageError
from .images import ImageFit, column_values, header_size, raw_image_chunks
from .prepare import prepare_image, sample_length
from .samples import image_refs
from .validate import check_bad_fraction, each_image_once, which_image

log = logging.getLogger(__name__)

SKIP_FILE = "skipped_in_training.jsonl"
# Images met before the bad fraction is judged: a few bad files early in the order must not stop a run.
MIN_SEEN_FOR_FRACTION = 100


def is_lazy(n_rows: int, lazy_above: int | None) -> bool:
    """Whether a training split of n_rows is prepared lazily (`--lazy_images_above`; None: never)."""
    return lazy_above is not None and n_rows > lazy_above


def _with_column(dataset, name: str, values: list):
    """dataset.add_column without hashing the values for its fingerprint (seconds for 100,000 rows)."""
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    fingerprint = hashlib.sha1(f"{dataset._fingerprint}|lazy|{name}".encode()).hexdigest()[:16]
    return dataset.add_column(name, values, new_fingerprint=fingerprint)


def _source_name(source: Any) -> str:
    if isinstance(source, dict):
        source = source.get("path") or "<image bytes>"
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__} image>"


def scan_split(dataset, split: str, *, max_bad_fraction: float, workers: int | None = None):
    """(dataset without rows whose image headers are unusable + a `source_size` column [w, h], skipped rows).

    Every image of a row counts: a multi-image sample (`more_images`) also gets `more_source_sizes` ([[w, h], ...])
    and is skipped when any of its images is unusable. Each distinct image is opened once."""
    if not len(dataset):
        return dataset, []
    multi = "more_images" in dataset.column_names

    def size_or_problem(source) -> tuple[int, int] | str:
        try:
            return header_size(source)
        except ImageError as exc:
            return str(exc)

    ids = column_values(dataset, "id")
    skipped, results, done = [], [], {}
    # Images embedded as bytes: read a chunk of rows at a time (images.raw_image_chunks); paths: one chunk.
    # Single-image listings skip raw_image_lists' per-row JSON parse (0.4 s per 100,000 rows on the 2-core machine).
    for offset, chunk in raw_image_chunks(dataset, lists=multi):
        rows = chunk if multi else [[source] for source in chunk]
        # Rows sharing a file path share one header read (threads: the cost is file system calls, not decoding).
        found = each_image_once(rows, size_or_problem, workers, offset=offset, done=done)
        for i, (images, found_row) in enumerate(zip(rows, found), offset):
            bad = next((j for j, r in enumerate(found_row) if isinstance(r, str)), None)
            if bad is not None:
                skipped.append({"split": split, "id": ids[i], "image": _source_name(images[bad]),
                                "reason": which_image(bad, len(images)) + found_row[bad]})
        results += found
    check_bad_fraction(skipped, len(dataset), split, max_bad_fraction)
    keep = [i for i, r in enumerate(results) if not any(isinstance(size, str) for size in r)]
    if skipped:
        dataset = dataset.select(keep)
    dataset = _with_column(dataset, "source_size", [list(results[i][0]) for i in keep])
    if multi:
        dataset = _with_column(dataset, "more_source_sizes", [[list(size) for size in results[i][1:]] for i in keep])
    return dataset, skipped


def plan_images(dataset, fit: ImageFit) -> tuple[Any, dict]:
    """The columns preparation would add (`length`, `image_tokens`, `image_shape`), from the header sizes alone
    (`source_size`, and `more_source_sizes` for a multi-image sample), counted as data/prepare.py counts them."""
    fitted: dict[tuple[int, int], tuple[int, int]] = {}  # a few distinct sizes among many rows

    def output_size(size) -> tuple[int, int]:
        size = tuple(size)
        return fitted.get(size) or fitted.setdefault(size, fit.output_size(size))

    sizes = [output_size(size) for size in column_values(dataset, "source_size")]
    more = ([[output_size(size) for size in row] for row in column_values(dataset, "more_source_sizes")]
            if "more_source_sizes" in dataset.column_names else [[] for _ in sizes])
    answers = column_values(dataset, "target") if "target" in dataset.column_names else [""] * len(sizes)
    columns = {"length": [sample_length(fit, size, answer) + sum(fit.image_tokens(s) for s in others)
                          for size, others, answer in zip(sizes, more, answers)],
               "image_tokens": [sum(fit.image_tokens(s) for s in [size, *others]) for size, others in zip(sizes, more)],
               "image_shape": ["+".join(f"{w}x{h}" for w, h in [size, *others]) for size, others in zip(sizes, more)]}
    for name, values in columns.items():
        dataset = _with_column(dataset, name, values)
    stats = {"images": len(dataset), "lazy": True, "distinct_shapes": len(set(columns["image_shape"])),
             "image_fit": {"max_side": fit.max_side, "factor": fit.factor, "buckets": fit.buckets}}
    log.info("%d training images are prepared as batches first need them (lazy: more rows than "
             "--lazy_images_above); %d image shapes from their headers", len(dataset), stats["distinct_shapes"])
    return dataset, stats


class LazyImages:
    """Wraps a collator: each example's image is decoded, sized and cached (`prepare_image`) before the
    collator sees it; an image that cannot be decoded is skipped, counted and logged, never a crash inside
    the processor. `fit` None: no preparation, only the decode check (--preprocess_images false)."""

    def __init__(self, collator, fit: ImageFit | None, skip_file: str | Path, max_bad_fraction: float):
        self.collator, self.fit, self.max_bad_fraction = collator, fit, max_bad_fraction
        self.skip_file = str(skip_file)
        self.seen, self.skipped, self._fallback = 0, 0, None

    def __getattr__(self, name: str):  # everything else is the wrapped collator's
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def _usable(self, example: dict) -> dict | None:
        """The example with every image (`image`, then `more_images`) decoded and prepared, or None (skipped)."""
        self.seen += 1
        images, paths = image_refs(example), []
        for position, source in enumerate(images):
            try:
                if self.fit is None:
                    from .images import load_image

                    load_image(source)
                    continue
                paths.append(prepare_image(source, self.fit)[0])
            except ImageError as exc:
                self._skip(example, which_image(position, len(images)) + str(exc), source)
                return None
        if self.fit is None:
            return example
        prepared = {**example, "image": paths[0]}
        if len(images) > 1 or "more_images" in example:
            prepared["more_images"] = json.dumps(paths[1:])
        return prepared

    def _skip(self, example: dict, reason: str, source: Any) -> None:
        self.skipped += 1
        record = {"id": example.get("id"), "image": _source_name(source), "reason": reason}
        with open(self.skip_file, "a") as f:  # one short line per write: whole lines even from several workers
            f.write(json.dumps(record) + "\n")
        log.warning("training image skipped (%d of %d met so far in this process cannot be decoded): %s",
                    self.skipped, self.seen, reason)
        if self.seen >= MIN_SEEN_FOR_FRACTION and self.skipped / self.seen > self.max_bad_fraction:
            raise DataError(f"{self.skipped} of the {self.seen} training images met so far cannot be decoded, more "
                            f"than --max_bad_fraction={self.max_bad_fraction:.0%} (listed in {self.skip_file}). Fix "
                            "or remove those files, or raise --max_bad_fraction.")

    def __call__(self, examples: list[dict]):
        usable = [e for e in map(self._usable, examples) if e is not None]
        if usable:
            self._fallback = usable[-1]
        elif self._fallback is not None:  # a batch of unusable images only: repeat the last good example
            usable = [self._fallback]
        else:
            raise DataError(f"None of the first {self.seen} training images met could be decoded (listed in "
                            f"{self.skip_file}). Check the image files of the listing.")
        return self.collator(usable)


def skipped_in_training(run_dir: str | Path) -> list[dict]:
    """The training images this process's collators skipped (all its data loader workers together)."""
    path = Path(run_dir) / SKIP_FILE
    return [json.loads(line) for line in path.open() if line.strip()] if path.is_file() else []


def add_skipped(run_dir: str | Path, records: list[dict]) -> None:
    """Append other processes' skipped images (the other ranks', whose own side files are scratch) to the list."""
    if records:
        with open(Path(run_dir) / SKIP_FILE, "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
