"""Class folders: `<class>/*.png`, `<class>/{train,test}/*.png` or `{train,test}/<class>/*.png`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ...errors import DataError
from ..images import IMAGE_EXTENSIONS
from .columns import _split_of
from .holdout import _assign_splits, _check_labels, _to_datasetdict, merge_label_variants
from .locations import absolute

if TYPE_CHECKING:
    from datasets import DatasetDict

log = logging.getLogger(__name__)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def find_folder_root(root: Path) -> Path:
    """Step down through single sub-folders holding no images (Kaggle's 'X/X/' wrappers)."""
    folder = root
    for _ in range(6):
        subdirs = _subdirs(folder)
        if (len(subdirs) == 1 and not _images_in(folder) and not _images_in(subdirs[0])
                and _split_of(subdirs[0].name, (), ()) is None):
            folder = subdirs[0]
        else:
            break
    return folder


def folder_rows(root: str | os.PathLike, *, train_split: str = "train",
                test_split: str = "test") -> tuple[list[dict], bool, Path]:
    """Rows {image, target, id, split} from class folders; returns (rows, has_split_folders, class root)."""
    root = absolute(root)
    if not root.is_dir():
        raise DataError(f"Data folder not found: {root}. "
                        "Pass --data_dir: a folder of class folders, or a CSV/JSONL listing.")
    base = find_folder_root(root)
    top = _subdirs(base)
    split_first = [d for d in top if _split_of(d.name, (train_split,), (test_split,))]
    rows: list[dict] = []
    if split_first and any(_subdirs(d) for d in split_first):
        # {train,test}/<class>/*
        for split_dir in split_first:
            split = _split_of(split_dir.name, (train_split,), (test_split,))
            for class_dir in _subdirs(split_dir):
                rows += [{"image": str(p), "target": class_dir.name, "id": str(p.relative_to(base)), "split": split}
                         for p in _images_in(class_dir)]
        has_splits = True
    else:
        # <class>/{train,test}/* or <class>/*
        has_splits = False
        for class_dir in top:
            parts = [(s, d) for d in _subdirs(class_dir) if (s := _split_of(d.name, (train_split,), (test_split,)))]
            if parts:
                has_splits = True
                for split, where in parts:
                    rows += [{"image": str(p), "target": class_dir.name, "id": str(p.relative_to(base)), "split": split}
                             for p in _images_in(where)]
            rows += [{"image": str(p), "target": class_dir.name, "id": str(p.relative_to(base)),
                      "split": None} for p in _images_in(class_dir)]
    if not rows:
        found = ", ".join(p.name for p in sorted(base.iterdir())[:12]) or "nothing"
        raise DataError(
            f"No images found in class folders under {base} (it contains: {found}). Expected '<class>/*.png', "
            f"'<class>/{{train,test}}/*.png' or '{{train,test}}/<class>/*.png' "
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)}), "
            "or pass a CSV/JSONL listing instead."
        )
    if has_splits and any(r["split"] is None for r in rows):
        loose = sum(r["split"] is None for r in rows)
        log.warning("%s: %d images sit directly in class folders that also have split folders; they go to train.",
                    base, loose)
        for r in rows:
            r["split"] = r["split"] or "train"
    return rows, has_splits, base


def load_folders(root: str | os.PathLike, *, labels: Sequence[str] = (), test_fraction: float = 0.1,
                 seed: int = 3407, train_split: str = "train", test_split: str = "test") -> "DatasetDict":
    """Train/test splits from class folders, with or without split folders (see the module docstring)."""
    rows, has_splits, base = folder_rows(root, train_split=train_split, test_split=test_split)
    merge_label_variants(rows, labels, str(base))
    splits = _assign_splits(rows, where=str(base), stratify=True, test_fraction=test_fraction, seed=seed,
                            had_split_column=has_splits)
    _check_labels(splits, labels, str(base))
    return _to_datasetdict(splits)
