"""From rows {image, target, id, split} to the train/test `DatasetDict`: the seeded, stratified hold-out
when the data has no test split, the label check, unique ids.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Sequence

from ...errors import ConfigError, DataError
from ..splits import held_out_groups

if TYPE_CHECKING:
    from datasets import DatasetDict

log = logging.getLogger(__name__)
MIN_CLASS_SIZE_FOR_TEST = 3  # classes smaller than this stay entirely in train when a split is held out


def stratified_split(rows: Sequence[dict], *, test_fraction: float, seed: int, stratify: bool = True,
                     key: str = "target") -> tuple[list[dict], list[dict]]:
    """Hold out `test_fraction` of the rows (of every class when stratified), seeded and order-independent."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1 (got {test_fraction}).")
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row[key]) if stratify else ""].append(row)
    train, test, too_small = [], [], []
    for name in sorted(groups):
        group = sorted(groups[name], key=lambda r: str(r.get("id", "")))
        random.Random(f"{seed}:{name}").shuffle(group)
        n = len(group)
        if stratify and n < MIN_CLASS_SIZE_FOR_TEST:
            n_test = 0
            too_small.append(name)
        else:
            n_test = min(max(1, round(n * test_fraction)), n - 1) if n > 1 else 0
        test += group[:n_test]
        train += group[n_test:]
    if too_small:
        log.warning("Classes with fewer than %d examples stay entirely in the training split (none held out for "
                    "testing): %s", MIN_CLASS_SIZE_FOR_TEST, ", ".join(too_small))
    return train, test


def image_group_keys(rows: Sequence[dict]) -> list[str]:
    """One key per row: rows that show the same image (several questions or captions about one X-ray; a multi-image
    row that shares any image with another) get the same key. Its `image_group` value when filled, else its image
    paths as listed (copies under other names are the leakage check's to find)."""
    from ..splits import joined_groups

    def keys(row: dict) -> list[str]:
        if row.get("image_group"):
            return [f"group:{row['image_group']}"]
        more = row.get("more_images") or "[]"
        return [f"image:{ref}" for ref in [row["image"], *(json.loads(more) if isinstance(more, str) else more)]]

    return joined_groups(keys(row) for row in rows)


def _assign_splits(rows: list[dict], *, where: str, stratify: bool, test_fraction: float, seed: int,
                   had_split_column: bool) -> dict[str, list[dict]]:
    """rows carry 'split' in {'train', 'test', 'val', None}: the final train and test lists."""
    by_split: dict[Any, list[dict]] = defaultdict(list)
    for row in rows:
        by_split[row.pop("split", None)].append(row)
    train, test, val = by_split["train"], by_split["test"], by_split["val"]
    if by_split[None] and had_split_column:
        raise DataError(f"{where}: {len(by_split[None])} rows have an empty split value. Fill it in (train or test), "
                        "or remove the split column to hold out a test split automatically.")
    train += by_split[None]
    if val and test:
        log.warning("%s: %d validation rows are not used (evaluation uses the %d test rows).",
                    where, len(val), len(test))
    elif val:
        log.info("%s: no test rows; the %d validation rows are the test split.", where, len(val))
        test = val
    if not test:
        if not train:
            raise DataError(f"{where}: no usable rows.")
        how = "no split column" if not had_split_column else "no test rows"
        keys = [] if stratify else image_group_keys(train)
        if stratify or len(set(keys)) == len(train):  # classes, or no image shown twice (split as before: by row)
            train, test = stratified_split(train, test_fraction=test_fraction, seed=seed, stratify=stratify)
            by = "stratified by class" if stratify else "random"
        elif len(set(keys)) < 2:  # every row shares an image with another: cannot part
            train, test = stratified_split(train, test_fraction=test_fraction, seed=seed, stratify=False)
            by = "random rows; they all share images, so the test images are in training too"
        else:  # questions / captions about one image: whole images held out, or a test row's image is trained on
            held = held_out_groups(keys, test_fraction=test_fraction, seed=seed)
            train, test = ([r for r, k in zip(train, keys) if k not in held],
                           [r for r, k in zip(train, keys) if k in held])
            by = f"whole images: {len(held)} of {len(set(keys))}, with every row that shows them"
        if not test:
            raise DataError(f"{where}: too few examples to hold out a test split ({len(train)} rows"
                            + (f"; every class has fewer than {MIN_CLASS_SIZE_FOR_TEST}" if stratify else "")
                            + "). Add a split column (train/test) or more examples.")
        log.warning("%s: %s; held out %d of %d examples for testing (%s, %.0f%%, seed %d).", where, how, len(test),
                    len(train) + len(test), by, 100 * test_fraction, seed)
    if not train:
        raise DataError(f"{where}: no training rows (every row is in the test split).")
    return {"train": train, "test": test}


def _check_labels(splits: dict[str, list[dict]], labels: Sequence[str], where: str) -> None:
    if not labels:
        return
    known = set(labels)
    unknown = Counter(r["target"] for rows in splits.values() for r in rows if r["target"] not in known)
    if unknown:
        shown = ", ".join(f"'{k}' ({v})" for k, v in unknown.most_common(10))
        raise DataError(f"{where}: labels not among the configured classes: {shown}. Add them to --labels "
                        f"(now: {', '.join(labels)}) or fix the data.")
    missing = sorted(known - {r["target"] for r in splits["train"]})
    if missing:
        log.warning("%s: no training examples for classes %s", where, ", ".join(missing))


def _dedupe_ids(rows: list[dict]) -> None:
    seen: Counter = Counter()
    for row in rows:
        seen[row["id"]] += 1
        if seen[row["id"]] > 1:
            row["id"] = f"{row['id']}#{seen[row['id']]}"


def _to_datasetdict(splits: dict[str, list[dict]]) -> "DatasetDict":
    """Rows -> string columns: image, target, id, then whatever else the rows carry (question, messages, ...)."""
    import datasets

    extra = sorted({k for rows in splits.values() for r in rows for k in r} - {"image", "target", "id", "split"})
    names = ("image", "target", "id", *extra)
    features = datasets.Features({k: datasets.Value("string") for k in names})
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({k: [str(r.get(k, "")) for r in rows] for k in names}, features=features)
        for name, rows in splits.items()
    })


def label_key(label: str) -> str:
    """What makes two labels the same class: case and spacing do not ('Normal', 'normal ', 'NORMAL')."""
    return " ".join(str(label).split()).casefold()


def merge_label_variants(rows: list[dict], labels: Sequence[str], where: str) -> None:
    """Labels that differ only in case or spacing become one class, with a warning naming them.

    The spelling kept is the configured one (--labels) when there is one, else the most frequent (ties: the
    first in sorted order). Merging, not refusing: a listing typed by hand often has a stray 'normal ', and
    it is plainly the same class; the warning names every variant so a real distinction can be restored."""
    counts = Counter(r["target"] for r in rows)
    by_key: dict[str, list[str]] = defaultdict(list)
    for label in sorted(counts):
        by_key[label_key(label)].append(label)
    configured = {label_key(label): label for label in labels}
    renamed: dict[str, str] = {}
    for key, variants in by_key.items():
        keep = configured.get(key) or sorted(variants, key=lambda v: (-counts[v], v))[0]
        if len(variants) > 1 or variants[0] != keep:
            renamed.update({v: keep for v in variants if v != keep})
            log.warning("%s: labels that differ only in case or spacing are one class, '%s': %s. Fix the listing if "
                        "they are meant to be different classes.", where, keep,
                        ", ".join(f"{v!r} ({counts[v]})" for v in variants))
    for row in rows:
        row["target"] = renamed.get(row["target"], row["target"])


def duplicate_rows(rows: list[dict], where: str, *, drop: bool) -> list[dict]:
    """Rows that repeat an earlier row (same image, answer, split and other fields) would count twice in
    training: warned with a count, or dropped with `drop` (--drop_duplicates)."""
    seen: set[tuple] = set()
    kept, repeats = [], []
    for row in rows:
        key = tuple(sorted((k, str(v)) for k, v in row.items() if k != "id"))
        if key in seen:
            repeats.append(row)
            if drop:
                continue
        seen.add(key)
        kept.append(row)
    if repeats:
        example = repeats[0]["id"].split("#")[0]
        if drop:
            log.warning("%s: dropped %d duplicate rows (same image and answer as an earlier row; e.g. '%s').",
                        where, len(repeats), example)
        else:
            log.warning("%s: %d rows repeat an earlier row (same image and answer; e.g. '%s'), so they count twice "
                        "in training. Pass --drop_duplicates to keep one of each.", where, len(repeats), example)
    return kept
