"""CSV/TSV, JSONL and JSON listings: one row per image (see the package docstring for the columns)."""
from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ...errors import DataError
from ..conversations import _image_list, conversation_column, vqa_fields
from .columns import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    _apply_aliases,
    _check_template,
    _format_target,
    _pick_column,
    _split_column,
    _split_of,
    _unknown_splits,
    _vqa_columns,
)
from .conversation_rows import _conversation_rows
from .holdout import _assign_splits, _check_labels, _dedupe_ids, _to_datasetdict, duplicate_rows, merge_label_variants
from .locations import _check_paths_exist, _localize, absolute, image_location, row_name

if TYPE_CHECKING:
    from datasets import DatasetDict

log = logging.getLogger(__name__)
LISTING_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def is_listing(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(LISTING_EXTENSIONS)


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's objects, read a line at a time: a chat export with inline base64 images is mostly image text,
    and the whole file's text held beside its split lines and parsed rows took three times its size. Lines end at
    newlines only (str.splitlines also split inside strings holding U+2028, which JSON allows unescaped)."""
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}). "
                                "Each line must be one JSON object.") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object with named fields.")
            rows.append(row)
    return rows


def read_listing(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV (header line), JSONL (one object per line) or JSON (a list of objects) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Listing not found: {path}. Pass the CSV/JSONL file (or its folder) with --data_dir.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            rows = _jsonl_rows(path)
        elif suffix == ".json":
            rows = _json_rows(path.read_text(encoding="utf-8-sig"), path)
        else:
            rows = _csv_rows(path.read_text(encoding="utf-8-sig"), path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}). Save the listing as UTF-8.") from exc
    if not rows:
        raise DataError(f"{path} lists no images (it has no data rows).")
    return rows


def _json_rows(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}).") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (one per image), or JSONL (one object per line).")
    return data


def _csv_rows(text: str, path: Path) -> list[dict[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else _sniff_delimiter(text)
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path} is empty: expected a header line (e.g. path,label,split) and one row per image.")
    rows = []
    for number, row in enumerate(reader, 2):
        if None in row:
            raise DataError(f"{path}, line {number}: more fields than the header has columns "
                            f"({', '.join(reader.fieldnames)}). Quote values that contain '{delimiter}'.")
        rows.append({str(k).strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()})
    return rows


def _sniff_delimiter(text: str) -> str:
    header = text.splitlines()[0] if text else ""
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def rows_from_records(records: Sequence[Mapping[str, Any]], *, where: str, base_dir: Path | None = None,
                      task: str = "classification", image_column: str | None = None,
                      target_column: str | None = None, target_template: str | None = None,
                      column_aliases: Mapping[str, Sequence[str]] | None = None, split_column: str | None = "split",
                      train_split: str = "train", test_split: str = "test",
                      vqa: Mapping[str, str | None] | None = None) -> tuple[list[dict], bool]:
    """Rows {image, target, id, split} from raw records; returns (rows, whether a split column was used).

    task "vqa": question/answer columns named by `vqa` (conversations.vqa_fields), or a `messages` /
    `conversations` column (conversations.conversation_row)."""
    aliases = dict(column_aliases or {})
    columns = list(dict.fromkeys(k for r in records[:1000] for k in r))
    chat_col = conversation_column(columns) if task == "vqa" else None
    if chat_col:
        return _conversation_rows(records, columns, chat_col, where=where, base_dir=base_dir,
                                  image_column=image_column, split_column=split_column,
                                  split_names=(train_split, test_split))
    image_col = _pick_column(columns, image_column or None, (*aliases.get("image", ()), *IMAGE_COLUMNS), "image",
                             where, "--image_column")
    vqa_cols = _vqa_columns(columns, vqa or {}, where) if task == "vqa" else None
    target_column = vqa_cols["answer"] if vqa_cols else target_column
    if target_template:
        _check_template(target_template, columns, aliases, where)
        target_col = None
    else:
        candidates = LABEL_COLUMNS if task == "classification" else TEXT_COLUMNS
        target_col = _pick_column(columns, target_column or None, candidates, "label" if task == "classification"
                                  else "text", where, "--target_column")
    split_col = _split_column(columns, split_column)
    rows, dropped, bad_splits = [], 0, Counter()
    for record in records:
        image = record.get(image_col)
        target = (_format_target(target_template, _apply_aliases(record, aliases)) if target_template
                  else ("" if record.get(target_col) is None else str(record.get(target_col)).strip()))
        if image in (None, "") or not target:
            dropped += 1
            continue
        split = None
        if split_col is not None and str(record.get(split_col) or "").strip():
            split = _split_of(record[split_col], (train_split,), (test_split,))
            if split is None:
                bad_splits[str(record[split_col])] += 1
                continue
        # vqa: every other column rides along, for instructions that name it ("{modality}: {question}")
        extra = {str(k): "" if v is None else str(v) for k, v in record.items() if k not in (image_col, split_col)
                 } if vqa_cols else {}
        # several images of one sample (two views of a patient): a list, or its JSON text in a CSV cell
        listed = _image_list(image)
        images = listed if isinstance(listed, list) else [image]
        if not images or any(v in (None, "") for v in images):
            dropped += 1
            continue
        located = [image_location(v, base_dir) for v in images]
        name = row_name(images[0], located[0])
        rows.append({**extra, "image": located[0], "target": target, "id": name, "split": split,
                     **({"more_images": json.dumps(located[1:])} if len(located) > 1 else {}),
                     **({"image_id": name, **vqa_fields(record, **vqa_cols)} if vqa_cols else {})})
    if bad_splits:
        raise _unknown_splits(where, split_col, bad_splits)
    if dropped:
        log.warning("%s: %d rows without an image or a %s were skipped", where, dropped,
                    "target" if target_template else f"'{target_col}'")
    if not rows:
        raise DataError(f"{where}: no row has both an image and a target.")
    _dedupe_ids(rows)
    return rows, split_col is not None


def load_table(path: str | os.PathLike, *, task: str = "classification", image_column: str | None = None,
               target_column: str | None = None, target_template: str | None = None,
               column_aliases: Mapping[str, Sequence[str]] | None = None, split_column: str | None = "split",
               labels: Sequence[str] = (), test_fraction: float = 0.1, seed: int = 3407,
               train_split: str = "train", test_split: str = "test",
               vqa: Mapping[str, str | None] | None = None, drop_duplicates: bool = False) -> "DatasetDict":
    """Train/test splits from a CSV/TSV/JSONL/JSON listing (see the module docstring)."""
    path = Path(path).expanduser()
    where = str(path)
    rows, had_split = rows_from_records(read_listing(path), where=where, base_dir=absolute(path).parent, task=task,
                                        image_column=image_column, target_column=target_column,
                                        target_template=target_template, column_aliases=column_aliases,
                                        split_column=split_column, train_split=train_split, test_split=test_split,
                                        vqa=vqa)
    _check_paths_exist(rows, absolute(path).parent, where)
    if task == "classification":
        merge_label_variants(rows, labels, where)
    rows = duplicate_rows(rows, where, drop=drop_duplicates)
    rows = _localize(rows, where)
    splits = _assign_splits(rows, where=where, stratify=task == "classification", test_fraction=test_fraction,
                            seed=seed, had_split_column=had_split)
    _check_labels(splits, labels if task == "classification" else (), where)
    return _to_datasetdict(splits)
