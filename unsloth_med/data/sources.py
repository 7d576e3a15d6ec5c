"""Where examples come from: Kaggle class folders, local class folders, Hugging Face datasets.

Every source ends as a `datasets.DatasetDict` with "train" and "test" splits and three columns:
`image` (a file path, or an image from a HF dataset), `target` (the answer text: a class name or a
caption) and `id` (a stable name for messages and reports). Images are decoded later, lazily, by
`images.load_image`, so a 10k-image dataset costs no memory until it is used.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CredentialsError, DataError, NetworkError
from .images import IMAGE_EXTENSIONS
from .tables.locations import absolute

if TYPE_CHECKING:
    from datasets import DatasetDict

    from ..recipes.base import Recipe

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("UNSLOTH_MED_CACHE", Path.home() / ".cache" / "unsloth_med"))


# ----------------------------------------------------------------------------- class folders
def find_class_root(root: Path, layout: tuple[str, ...], split_names: tuple[str, str], *,
                    downloadable: bool = False) -> Path:
    """The folder that holds one sub-folder per class.

    Accepts the download root (Kaggle layout below it), any folder part-way down the layout, or the
    class root itself, so users can point --data-dir at whatever they unzipped.
    """
    if not root.exists():
        raise DataError(
            f"Data folder not found: {root}. Pass --data_dir pointing at the dataset (the folder that contains "
            f"'{'/'.join(layout) or '<class folders>'}')"
            + (", or leave it out to download the recipe's default dataset." if downloadable else ".")
        )
    candidates = [root / Path(*layout[i:]) for i in range(len(layout))] + [root]
    for candidate in candidates:
        if candidate.is_dir() and _looks_like_class_root(candidate, split_names):
            return candidate
    found = sorted(p.name for p in root.iterdir())[:12]
    raise DataError(
        f"No class folders found under {root} (it contains: {', '.join(found) or 'nothing'}). Expected the layout "
        f"'{'/'.join(layout + ('<class>', f'{{{split_names[0]},{split_names[1]}}}', '*.jpg'))}' "
        "or '<class>/*.jpg'. Point --data_dir at the folder that holds the class folders or their parent."
    )


def _looks_like_class_root(folder: Path, split_names: tuple[str, str]) -> bool:
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    return bool(subdirs) and any(
        (d / split_names[0]).is_dir() or (d / split_names[1]).is_dir() or any(image_files(d)) for d in subdirs
    )


def image_files(folder: Path) -> list[Path]:
    """The image files directly in a folder, sorted (none when it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_class_folders(
    root: Path, *, layout: tuple[str, ...] = (), labels: tuple[str, ...] = (), split_names=("Train", "Test"),
    downloadable: bool = False,
) -> dict[str, list[dict]]:
    """Rows per split from `<class>/{Train,Test}/*` (or `<class>/*` with no splits: all go to 'train').

    With `labels`, the folders must be exactly those classes; otherwise the folder names are the labels.
    `downloadable`: the recipe has a default dataset to download (a missing folder's message says so).
    """
    class_root = find_class_root(absolute(root), layout, split_names, downloadable=downloadable)
    folders = sorted(p for p in class_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = [p.name for p in folders]
    if labels:
        unknown = sorted(set(names) - set(labels))
        missing = sorted(set(labels) - set(names))
        if unknown or missing:
            raise DataError(
                f"Class folders in {class_root} do not match the recipe's classes. "
                + (f"Unknown folders: {unknown}. " if unknown else "")
                + (f"Missing classes: {missing}. " if missing else "")
                + "Rename or remove the folders, or use the generic `classify` recipe for your own classes."
            )
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    skipped = 0
    for folder in folders:
        has_splits = any((folder / s).is_dir() for s in split_names)
        parts = ([(split, folder / name) for split, name in zip(("train", "test"), split_names)] if has_splits
                 else [("train", folder)])
        for split, where in parts:
            if not where.is_dir():
                continue
            for path in image_files(where):
                rows[split].append({"image": str(path), "target": folder.name, "id": str(path.relative_to(class_root))})
            skipped += sum(1 for p in where.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS)
        counts = {split: sum(1 for r in rows[split] if r["target"] == folder.name) for split in rows}
        if counts["train"] == 0:
            where = f"{folder}/{split_names[0]}" if has_splits else str(folder)
            raise DataError(
                f"Class '{folder.name}' has no training images in {where}"
                + (f" (it has {counts['test']} test images)" if counts["test"] else "")
                + f". Add images with one of the extensions {', '.join(IMAGE_EXTENSIONS)} or remove the folder."
            )
    if skipped:
        log.warning("Skipped %d files that are not images (by extension) under %s", skipped, class_root)
    return rows


# ----------------------------------------------------------------------------- Kaggle
def kaggle_credentials_present() -> bool:
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return bool(
        (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"))
        or os.environ.get("KAGGLE_API_TOKEN")
        or (config_dir / "kaggle.json").is_file()
        or (config_dir / "access_token").is_file()
    )


def download_kaggle(dataset_id: str, dest: Path | None = None) -> Path:
    """Download and unzip a Kaggle dataset once; later calls reuse the folder."""
    dest = dest or cache_dir() / "datasets" / dataset_id.replace("/", "__")
    done = dest / ".complete"
    if done.exists():
        return dest
    if not kaggle_credentials_present():
        raise CredentialsError(
            f"Downloading Kaggle dataset '{dataset_id}' needs Kaggle credentials, and none were found "
            "(KAGGLE_USERNAME + KAGGLE_KEY, KAGGLE_API_TOKEN, or ~/.kaggle/kaggle.json). Create an API token at "
            "kaggle.com > Settings > API, or download the dataset yourself and pass --data_dir /path/to/it."
        )
    from kaggle.api.kaggle_api_extended import KaggleApi  # imported late: it reads credentials on import

    dest.mkdir(parents=True, exist_ok=True)
    try:
        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(dataset_id, path=str(dest), unzip=True, quiet=False)
    except Exception as exc:  # the kaggle client raises bare HTTP/socket errors
        raise NetworkError(
            f"Could not download Kaggle dataset '{dataset_id}' into {dest} ({type(exc).__name__}: {_redact(exc)}). "
            "Check the network and the dataset id, or download it by hand and pass --data_dir."
        ) from exc
    done.touch()
    return dest


def _redact(exc: Exception) -> str:
    from ..secrets import redact

    return redact(str(exc))[:300]


# ----------------------------------------------------------------------------- Hugging Face datasets
def load_hf(name_or_path: str, *, image_column: str, target_column: str, splits=("train", "test"), seed: int = 3407):
    import datasets

    try:
        if Path(name_or_path).exists():
            loaded = datasets.load_from_disk(name_or_path)
        else:
            loaded = datasets.load_dataset(name_or_path)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise NetworkError(
            f"Could not load the Hugging Face dataset '{name_or_path}' ({type(exc).__name__}: {_redact(exc)[:200]}). "
            "Without network access, save it once with `datasets.load_dataset(...).save_to_disk(DIR)` on a "
            "connected machine and pass --data_dir DIR."
        ) from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({splits[0]: loaded})
    for column in (image_column, target_column):
        if column not in loaded[next(iter(loaded))].column_names:
            raise DataError(
                f"Dataset '{name_or_path}' has no column '{column}' "
                f"(columns: {loaded[next(iter(loaded))].column_names}). "
                "Set --image_column / --target_column to the right names."
            )
    train_name, test_name = splits
    if test_name not in loaded:
        parts = loaded[train_name].train_test_split(test_size=0.1, seed=seed)
        loaded = datasets.DatasetDict({train_name: parts["train"], test_name: parts["test"]})
        log.warning("Dataset '%s' has no '%s' split: holding out 10%% of '%s' (seed %d)",
                    name_or_path, test_name, train_name, seed)
    out = datasets.DatasetDict()
    for split, name in (("train", train_name), ("test", test_name)):
        part = loaded[name].select_columns([image_column, target_column])
        part = part.rename_columns({image_column: "image", target_column: "target"})
        out[split] = part.add_column("id", [f"{name}/{i}" for i in range(len(part))])
    return out


# ----------------------------------------------------------------------------- the recipe's data
def load_recipe_data(recipe: "Recipe", data_dir: str | None = None, *, seed: int = 3407) -> "DatasetDict":
    """The recipe's train/test splits, from data_dir when given, else from its default source."""
    import datasets

    source = recipe.source
    if source.kind in ("table", "auto"):  # listings, class folders with or without splits, HF datasets by column
        from .tables import load_source

        return load_source(source, data_dir, labels=recipe.labels, task=recipe.task, seed=seed)
    if source.kind == "hf":
        return load_hf(data_dir or source.id, image_column=source.image_column, target_column=source.target_column,
                       splits=(source.train_split, source.test_split), seed=seed)
    if source.kind in ("kaggle_folders", "class_folders"):
        if data_dir is None:
            if source.kind != "kaggle_folders":
                raise DataError(f"Recipe '{recipe.name}' needs --data_dir (a folder with one sub-folder per class).")
            data_dir = str(download_kaggle(source.id))
        rows = load_class_folders(Path(data_dir), layout=source.layout, labels=recipe.labels,
                                  split_names=(source.train_split, source.test_split),
                                  downloadable=source.kind == "kaggle_folders" and bool(source.id))
        if not rows["test"]:
            raise DataError(
                f"No test images under {data_dir} "
                f"(expected '{source.test_split}' folders beside '{source.train_split}'). "
                "Evaluation needs a test split: add one, or use the generic `classify` recipe, which can hold one out."
            )
        return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})
    raise DataError(f"Recipe '{recipe.name}' has an unknown data source kind '{source.kind}'.")


def run_splits(recipe: "Recipe", data_dir: str | None = None, *, seed: int = 3407, split_by: str = "row",
               test_fraction: float = 0.1) -> "DatasetDict":
    """The train/test splits a training run makes of the recipe's data: load_recipe_data with the run's seed, then
    with split_by="image" a re-split in which no image is in both (splits.split_by_image). `unsloth-med evaluate`
    and `check-data` call it with the run's settings, so that they see the test split the run saw."""
    splits = load_recipe_data(recipe, data_dir, seed=seed)
    if split_by == "image":
        from .splits import split_by_image

        splits = split_by_image(splits, test_fraction=test_fraction, seed=seed)
    return splits


def subsample(dataset, limit: int | None, seed: int):
    """At most `limit` rows, chosen at random (seeded) so every class can appear."""
    if not limit or len(dataset) <= limit:
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))
