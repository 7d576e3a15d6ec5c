"""Hugging Face datasets (a hub name or a `save_to_disk` folder) as train/test splits."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from ...errors import DataError, NetworkError
from ..conversations import conversation_column, vqa_fields
from ..splits import held_out_groups
from .columns import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    _apply_aliases,
    _check_template,
    _format_target,
    _pick_column,
    _split_of,
    _vqa_columns,
)
from .conversation_rows import _conversation_rows
from .holdout import _assign_splits, _check_labels, _to_datasetdict
from .locations import _localize, cached_image_bytes, is_url

if TYPE_CHECKING:
    from datasets import DatasetDict

log = logging.getLogger(__name__)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file()
                                 for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def is_parquet_data(path: Path) -> bool:
    """A Parquet file, or a folder of them as the Hub keeps a dataset (`data/train-00000-of-00001.parquet`, as
    `huggingface-cli download --repo-type dataset` writes it): `datasets` reads both, split names from file names."""
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    return path.is_dir() and (any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")))


def _load(name_or_path: str):
    import datasets

    path = Path(name_or_path).expanduser()
    if path.exists() and not _is_saved_dataset(path) and is_parquet_data(path):
        if path.is_file():
            return datasets.load_dataset("parquet", data_files={"train": str(path)})
        return datasets.load_dataset(str(path))
    return datasets.load_from_disk(name_or_path) if path.exists() else datasets.load_dataset(name_or_path)


def load_hf_table(name_or_path: str, *, task: str = "captioning", image_column: str | None = None,
                  target_column: str | None = None, target_template: str | None = None,
                  column_aliases: Mapping[str, Sequence[str]] | None = None, labels: Sequence[str] = (),
                  train_split: str = "train", test_split: str = "test", test_fraction: float = 0.1,
                  seed: int = 3407, vqa: Mapping[str, str | None] | None = None) -> "DatasetDict":
    """Train/test splits from a HF dataset (hub name or save_to_disk folder): image column (an Image feature,
    paths or URLs) and a target column or template; a held-out test split when it has none."""
    import datasets

    from ..sources import _redact

    aliases = dict(column_aliases or {})
    try:
        loaded = _load(name_or_path)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise NetworkError(
            f"Could not load the Hugging Face dataset '{name_or_path}' ({type(exc).__name__}: {_redact(exc)[:200]}). "
            "Without network access, save it once with `datasets.load_dataset(...).save_to_disk(DIR)` on a "
            "connected machine and pass --data_dir DIR, or export it to a CSV listing. (If you meant a local "
            "folder or file: it does not exist.)"
        ) from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({train_split: loaded})
    names = list(loaded)
    train_name = (next((n for n in names if n == train_split), None)
                  or next((n for n in names if _split_of(n, (train_split,), ()) == "train"), names[0]))
    test_name = (next((n for n in names if n == test_split), None)
                 or next((n for n in names if _split_of(n, (), (test_split,)) == "test"), None)
                 or next((n for n in names if _split_of(n, (), ()) == "val"), None))
    where = f"dataset '{name_or_path}'"
    if test_name == train_name:  # its only split is a validation split: train on it, hold a test split out of it
        test_name = None
    columns = loaded[train_name].column_names
    chat_col = conversation_column(columns) if task == "vqa" else None
    if chat_col:  # LLaVA/ShareGPT `conversations` or OpenAI `messages`, with an image column or an `images` list
        return _hf_conversations(loaded, train_name, test_name, chat_col, image_column=image_column, where=where,
                                 test_fraction=test_fraction, seed=seed)
    image_col = _pick_column(columns, image_column or None, (*aliases.get("image", ()), *IMAGE_COLUMNS), "image",
                             where, "--image_column")
    vqa_cols = _vqa_columns(columns, vqa or {}, where) if task == "vqa" else None
    target_column = vqa_cols["answer"] if vqa_cols else target_column
    if target_template:
        _check_template(target_template, columns, aliases, where)
    else:
        target_col = _pick_column(columns, target_column or None,
                                  LABEL_COLUMNS if task == "classification" else TEXT_COLUMNS,
                                  "label" if task == "classification" else "text", where, "--target_column")

    def targets_of(part) -> list[str]:
        text_cols = [c for c in part.column_names if c != image_col]
        out = []
        for record in part.select_columns(text_cols):
            if target_template:
                out.append(_format_target(target_template, _apply_aliases(record, aliases)))
            else:
                value = record[target_col]
                if task == "classification" and isinstance(part.features[target_col], datasets.ClassLabel):
                    value = part.features[target_col].int2str(value)
                out.append("" if value is None else str(value).strip())
        return out

    def extras_of(part) -> dict[str, list[str]]:
        """VQA: question, answer type (and image group) per row, and every other non-image column as text, for
        instructions that name it ("{modality}: {question}"), as a listing's rows carry them."""
        if not vqa_cols:
            return {}
        other = {}
        for name, feature in part.features.items():
            if name in (image_col, "image", "target", "id", "split") or _image_kind(feature):
                continue
            values = part[name][:]
            if isinstance(feature, datasets.ClassLabel):
                values = [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
            other[name] = ["" if v is None else str(v) for v in values]
        text_cols = [c for c in (vqa_cols["question"], vqa_cols["answer"], vqa_cols["answer_type"],
                                 vqa_cols["image_group"]) if c]
        fields = [vqa_fields(record, **vqa_cols) for record in part.select_columns(text_cols)]
        return {**other, **{key: [str(f.get(key, "")) for f in fields]
                            for key in ("question", "answer_type", "image_group")}}

    def convert(part, split_name: str) -> "datasets.Dataset":
        targets = targets_of(part)
        keep = [i for i, t in enumerate(targets) if t]
        if len(keep) < len(targets):
            log.warning("%s/%s: %d rows with an empty target were skipped", where, split_name, len(targets) - len(keep))
            part, targets = part.select(keep), [targets[i] for i in keep]
        extras = extras_of(part)
        feature = part.features[image_col]
        if (isinstance(feature, dict) and "bytes" in feature) or getattr(feature, "dtype", None) in ("binary",
                                                                                                   "large_binary"):
            # {bytes, path} or bare bytes written without the Image feature's metadata (pyarrow, pandas): images
            part = part.cast_column(image_col, datasets.Image(decode=False))
        if isinstance(part.features[image_col], datasets.Image):
            images = part.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))
            images = images.rename_column(image_col, "image") if image_col != "image" else images
            images = images.add_column("target", targets)
            images = images.add_column("id", [f"{split_name}/{i}" for i in range(len(part))])
            for key, values in extras.items():
                images = images.add_column(key, values)
            return images
        values = [str(v).strip() if v is not None else "" for v in part[image_col]]
        rows = [{"image": v, "target": t, "id": v if not is_url(v) else f"{split_name}/{i}", "split": None,
                 **{key: column[i] for key, column in extras.items()}}
                for i, (v, t) in enumerate(zip(values, targets)) if v]
        rows = _localize(rows, f"{where}/{split_name}")
        return _to_datasetdict({"x": rows})["x"]

    train = convert(loaded[train_name], train_name)
    if test_name is None:
        if task == "classification" and not isinstance(train.features["image"], datasets.Image):
            # paths: stratified as a listing is (images embedded as bytes are never listed as rows: split below)
            rows = [dict(r, split=None) for r in train]
            return _to_datasetdict(_assign_splits(rows, where=where, stratify=True, test_fraction=test_fraction,
                                                  seed=seed, had_split_column=False))
        keys = None
        if task != "classification":  # questions / captions: whole images held out (by content: rows may hold copies)
            from ..splits import image_groups

            keys = image_groups(train, unreadable_ok=True)  # a missing file: the image checks skip and count it
        # classification, no image shown twice (split as before), or one image that every row shows
        if keys is None or len(set(keys)) in (1, len(keys)):
            split = train.train_test_split(test_size=test_fraction, seed=seed)
            log.warning("%s has no test split: holding out %.0f%% of '%s' (seed %d)",
                        where, 100 * test_fraction, train_name, seed)
            out = datasets.DatasetDict({"train": split["train"], "test": split["test"]})
        else:
            held = held_out_groups(keys, test_fraction=test_fraction, seed=seed)
            log.warning("%s has no test split: holding out %.0f%% of the images of '%s', every row that shows them "
                        "(%d of %d images, seed %d)", where, 100 * test_fraction, train_name, len(held),
                        len(set(keys)), seed)
            out = datasets.DatasetDict({"train": train.select([i for i, k in enumerate(keys) if k not in held]),
                                        "test": train.select([i for i, k in enumerate(keys) if k in held])})
    else:
        out = datasets.DatasetDict({"train": train, "test": convert(loaded[test_name], test_name)})
    if task == "classification" and labels:
        _check_labels({k: [{"target": t} for t in v["target"]] for k, v in out.items()}, labels, where)
    return out


def _image_file(value, where: str) -> str:
    """A dataset's image cell as a file path: a path as it is, image bytes (an undecoded Image feature) or a PIL
    image written once into the cache by content (the conversation rows name their images by path)."""
    import io

    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes"):
            return cached_image_bytes(value["bytes"])
        if value.get("path"):
            return str(value["path"])
        raise DataError(f"{where}: an image cell holds neither bytes nor a path.")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return cached_image_bytes(buffer.getvalue())
    return str(value)


def _image_kind(feature) -> str | None:
    """'one' for an Image feature, 'list' for a list of them (several images per row), else None."""
    import datasets

    if isinstance(feature, datasets.Image):
        return "one"
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    return "list" if isinstance(inner, datasets.Image) else None


def _hf_conversations(loaded, train_name: str, test_name: str | None, chat_col: str, *, image_column: str | None,
                      where: str, test_fraction: float, seed: int) -> "DatasetDict":
    """Conversation rows (data/conversations.py) from a HF dataset; images written to the cache by content."""
    import datasets

    def records(part, split_name: str) -> list[dict]:
        image_features = [name for name, feature in part.features.items() if _image_kind(feature)]
        for name in image_features:  # bytes and paths, not decoded pictures
            single = _image_kind(part.features[name]) == "one"
            part = part.cast_column(name, datasets.Image(decode=False) if single
                                    else datasets.List(datasets.Image(decode=False)))
        out = []
        for number, record in enumerate(part, 1):
            record = dict(record)
            for name in image_features:
                value = record[name]
                here = f"{where}/{split_name}, row {number}"
                record[name] = ([_image_file(v, here) for v in value] if isinstance(value, list)
                                else None if value is None else _image_file(value, here))
            out.append(record)
        return out

    columns = loaded[train_name].column_names
    parts = {}
    for split, name in (("train", train_name), ("test", test_name)):
        if name is None:
            continue
        rows, _ = _conversation_rows(records(loaded[name], name), columns, chat_col, where=f"{where}/{name}",
                                     base_dir=None, image_column=image_column, split_column=None,
                                     split_names=("train", "test"))
        rows = _localize(rows, f"{where}/{name}")  # image URLs (string columns) downloaded, as a listing's are
        parts[split] = [dict(row, split=split) for row in rows]
    if "test" not in parts:
        log.warning("%s has no test split: holding out %.0f%% of '%s' (seed %d)",
                    where, 100 * test_fraction, train_name, seed)
        return _to_datasetdict(_assign_splits([dict(r, split=None) for r in parts["train"]], where=where,
                                              stratify=False, test_fraction=test_fraction, seed=seed,
                                              had_split_column=False))
    return _to_datasetdict(parts)
