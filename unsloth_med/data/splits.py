"""`--split_by image`: train and test share no image.

Rows that show the same image (several questions about one X-ray) are one group: the image-group
column where the data has one, else the SHA-256 of the image's bytes (so a copy under another name is
the same image); rows of several images that share any of them are one group too. Whole groups are
held out, seeded, until `test_fraction` of the groups are in test.
The data's own split is not kept: a split that reuses images is the problem this solves.
"""
from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import ConfigError
from .images import raw_image_chunks

log = logging.getLogger(__name__)


def image_key(source: Any) -> str:
    """The content hash of one image (a path, HF {'bytes','path'} dict, or raw bytes)."""
    if isinstance(source, dict):
        data = source.get("bytes") or Path(source["path"]).read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        data = Path(source).read_bytes()
    return hashlib.sha256(data).hexdigest()


def joined_groups(keys_per_row: Iterable[Sequence[str]]) -> list[str]:
    """One key per row, the same for rows linked by any key they share (a study that is one row's current image
    and another row's prior): each row's first key, rows joined through shared keys (union-find)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    row_keys = []
    for keys in keys_per_row:
        for other in keys[1:]:
            parent[find(other)] = find(keys[0])
        row_keys.append(keys[0])
    return [find(key) for key in row_keys]


def image_groups(dataset, *, unreadable_ok: bool = False) -> list[str]:
    """One key per row: its image group when filled, else the content hashes of its images, joined: rows that
    share any image are one group. `unreadable_ok`: an image that cannot be read (a missing file, before the
    image checks skip and count it) is keyed by its path instead of stopping with an OSError."""
    def key(source: Any, where: str) -> str:
        try:
            return image_key(source)
        except (OSError, TypeError):  # TypeError: an empty (None) image cell
            if not unreadable_ok:
                raise
            name = source if isinstance(source, str) else isinstance(source, dict) and source.get("path")
            return f"unreadable:{name or where}"  # unnamed: its own group (row and position, stable across chunks)

    groups = list(dataset["image_group"][:]) if "image_group" in dataset.column_names else [""] * len(dataset)
    if all(groups):  # no image to hash
        return joined_groups([f"group:{group}"] for group in groups)

    def row_keys():  # images embedded as bytes: hashed a chunk of rows at a time (images.raw_image_chunks)
        rest = iter(groups)
        for start, rows in raw_image_chunks(dataset):
            for k, (images, group) in enumerate(zip(rows, rest), start):  # rows first: zip stops without taking
                yield [f"group:{group}"] if group else [key(source, f"row{k}:{j}")  # the next chunk's group
                                                        for j, source in enumerate(images)]

    return joined_groups(row_keys())


def held_out_groups(keys: Sequence[str], *, test_fraction: float, seed: int, stream: str | None = "images") -> set[str]:
    """The group keys held out for testing: `test_fraction` of the distinct groups (at least one, never all),
    seeded and independent of row order.

    `stream` keeps each caller's shuffle what it has always been (stream=None: the plain seed, which --split_by image
    has used since it began), so a run folder's test images are the same when `unsloth-med evaluate` re-splits."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1 (got {test_fraction}).")
    distinct = sorted(set(keys))
    random.Random(seed if stream is None else f"{seed}:{stream}").shuffle(distinct)
    n_test = min(max(1, round(len(distinct) * test_fraction)), len(distinct) - 1)
    return set(distinct[:n_test])


def split_by_image(splits, *, test_fraction: float, seed: int):
    """A DatasetDict {train, test} re-split so that no image group sits in both splits."""
    import datasets

    pooled = datasets.concatenate_datasets([splits["train"], splits["test"]])
    keys = image_groups(pooled)
    held_out = held_out_groups(keys, test_fraction=test_fraction, seed=seed, stream=None)
    test_rows = [i for i, k in enumerate(keys) if k in held_out]
    train_rows = [i for i, k in enumerate(keys) if k not in held_out]
    n_images = len(set(keys))
    log.warning("--split_by image: %d images (%d rows) -> %d train images / %d test images (%d / %d rows, seed %d)",
                n_images, len(keys), n_images - len(held_out), len(held_out), len(train_rows), len(test_rows), seed)
    return datasets.DatasetDict({"train": pooled.select(train_rows), "test": pooled.select(test_rows)})
