"""Your own data, without writing Python: listings, class folders and Hugging Face datasets.

Every loader here ends where every source in `sources.py` ends: a `datasets.DatasetDict` with
"train" and "test" splits and the columns `image` (a file path, or an undecoded HF image), `target`
(the answer text) and `id` (a stable name for messages and reports).

- **Listings** (`load_table`): a CSV/TSV, JSONL or JSON file with one row per image. The image column
  (`path`, `image`, `file`, `imageurl`, ... or `--image_column`) holds a path, resolved against the
  listing's own folder when relative, or an http(s) URL (downloaded once into the cache; offline, a
  clear NetworkError). The answer is one column (`label`/`class` for classification, `text`/`caption`
  for captioning, or `--target_column`) or a template over several columns
  (`"Product: {title}, Category: {category}, Full Price: {price}"`). An optional `split` column
  (train/test; val/validation/dev become the test split when there is no test) picks the splits;
  without one, a seeded split holds out `test_fraction` of every class (stratified).
- **Class folders** (`load_folders`): `<class>/*.png`, `<class>/{train,test}/*.png` or
  `{train,test}/<class>/*.png` (split names in any case; val/valid/validation accepted); the same
  stratified hold-out when there are no split folders. Single sub-folders on the way down (Kaggle's
  `X/X/`) are skipped.
- **Hugging Face datasets** (`load_hf_table`): a hub name, a `save_to_disk` folder, a .parquet file or a
  folder of them (a Hub download: data/train-*.parquet), with the same column names or template; an image
  column of URLs is downloaded like a listing's.

This package's modules: `listings` (CSV/JSONL/JSON), `folders` (class folders), `hf` (Hugging Face
datasets), `conversation_rows` (chat formats), `columns` (which column is what), `locations` (paths and
URL downloads), `holdout` (splits and the final DatasetDict). This module only dispatches:
`load_source(source, data_dir, ...)` picks the loader from what `data_dir` (or the source's default
`id`) is: a listing file; a folder holding exactly one listing (that listing); a `save_to_disk` folder,
a .parquet file or a folder of them; another folder (class folders); anything else is a HF dataset name.
`sources.load_recipe_data` calls it for sources of kind "table" and "auto".
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ...errors import ConfigError, DataError
from .folders import _subdirs, find_folder_root, load_folders
from .hf import _is_saved_dataset, is_parquet_data, load_hf_table
from .listings import LISTING_EXTENSIONS, is_listing, load_table

if TYPE_CHECKING:
    from datasets import DatasetDict



def detect_format(location: str) -> str:
    """'table', 'class_folders' or 'hf' for a --data_dir value (a file, a folder or a dataset name)."""
    path = Path(location).expanduser()
    if path.is_file():
        if is_listing(path):
            return "table"
        if is_parquet_data(path):  # a dataset's own file format (the Hub's): `datasets` reads it
            return "hf"
        raise DataError(f"{path} is not a listing: expected a {', '.join(LISTING_EXTENSIONS)} or .parquet file, a "
                        "folder of class folders, or a Hugging Face dataset.")
    if path.is_dir():
        if _is_saved_dataset(path):
            return "hf"
        listings = sorted(p for p in path.iterdir() if p.is_file() and is_listing(p))
        if len(listings) == 1:  # a folder with its listing: the listing says what the data is
            return "table"
        if not listings and is_parquet_data(path):  # a dataset downloaded from the Hub (data/*.parquet)
            return "hf"
        if any(_subdirs(find_folder_root(path))):
            return "class_folders"
        raise DataError(f"{path}: no class folders and {'several' if listings else 'no'} listing files "
                        f"({', '.join(p.name for p in listings[:5]) or 'none'}). Pass the listing file itself, "
                        "or a folder with one sub-folder per class.")
    if is_listing(location) or location.startswith((".", "/", "~")):
        raise DataError(f"Data not found: {location}. Pass an existing CSV/JSONL listing, a folder of class folders, "
                        "or a Hugging Face dataset name.")
    return "hf"


def _listing_in(path: Path) -> Path:
    if path.is_file():
        return path
    listings = sorted(p for p in path.iterdir() if p.is_file() and is_listing(p))
    return listings[0]


def load_source(source, data_dir: str | None = None, *, labels: Sequence[str] = (), task: str = "classification",
                seed: int = 3407) -> "DatasetDict":
    """A recipe source of kind "table" or "auto" (see recipes.base.TableSource) as train/test splits."""
    location = data_dir or getattr(source, "id", "")
    if not location:
        raise DataError("No data given: pass --data_dir (a CSV/JSONL listing, a folder with one sub-folder per class, "
                        "or a Hugging Face dataset name / save_to_disk folder).")
    location = str(location)
    fmt = getattr(source, "data_format", "auto") or "auto"
    fmt = detect_format(location) if fmt == "auto" else fmt
    image_column = getattr(source, "image_column", "") or None
    target_column = getattr(source, "target_column", "") or None
    if not hasattr(source, "data_format"):  # a plain DataSource: its generic defaults mean "detect"
        image_column = None if image_column == "image" else image_column
        target_column = None if target_column == "label" else target_column
    common = dict(test_fraction=float(getattr(source, "test_fraction", 0.1) or 0.1), seed=seed,
                  train_split=getattr(source, "train_split", "train") or "train",
                  test_split=getattr(source, "test_split", "test") or "test")
    template = getattr(source, "target_template", "") or None
    aliases = dict(getattr(source, "column_aliases", ()) or ())
    if task == "vqa":
        common["vqa"] = {key: getattr(source, f"{key}_column", "") or None
                         for key in ("question", "answer", "answer_type", "image_group")}
    if fmt == "table":
        return load_table(_listing_in(Path(location).expanduser()), task=task, image_column=image_column,
                          target_column=target_column, target_template=template, column_aliases=aliases,
                          split_column=getattr(source, "split_column", "split"), labels=labels,
                          drop_duplicates=bool(getattr(source, "drop_duplicates", False)), **common)
    if fmt == "class_folders":
        if task != "classification":
            common.pop("vqa", None)
            folder = Path(location).expanduser()
            listings = sorted(p.name for p in folder.iterdir() if p.is_file() and is_listing(p))
            if len(listings) > 1:  # SLAKE's layout: train.json, validate.json, test.json beside imgs/
                raise DataError(f"{location} holds {len(listings)} listings ({', '.join(listings[:6])}), so it is not "
                                "clear which to read. Pass one file with --data_dir, or merge them into one listing "
                                "with a split column (train/test) so the run keeps your test split.")
            raise DataError(f"{location} is a folder of class folders, which only a classification recipe can use. "
                            "For captions or questions, pass a CSV/JSONL listing with an image column and a text "
                            "column (or question and answer columns).")
        return load_folders(location, labels=labels, **common)
    if fmt == "hf":
        return load_hf_table(location, task=task, image_column=image_column, target_column=target_column,
                             target_template=template, column_aliases=aliases, labels=labels, **common)
    raise ConfigError(f"Unknown data format '{fmt}': use auto, table, class_folders or hf.")


def discover_labels(location: str, *, source=None, seed: int = 3407) -> tuple[str, ...]:
    """The sorted class names found in a listing, class folders or dataset (for recipes given no --labels).

    The loaders' warnings (labels merged, rows skipped, the held-out split) are left to the run's own load of the
    same data, which follows: said here too, each printed twice. Errors still stop here."""
    quiet = logging.getLogger("unsloth_med.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        splits = load_source(source, location, task="classification", seed=seed)
    finally:
        quiet.setLevel(level)
    found = set(splits["train"]["target"]) | set(splits["test"]["target"])
    return tuple(sorted(found))
