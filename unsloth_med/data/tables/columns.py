"""Finding the columns of a listing or dataset: image, target (a column or a template over several),
split, and the VQA question/answer columns.
"""
from __future__ import annotations

import difflib
import string
from collections import Counter
from typing import Any, Mapping, Sequence

from ...errors import ConfigError, DataError

IMAGE_COLUMNS = ("path", "image", "image_path", "filepath", "file_path", "file", "filename", "file_name",
                 "imageurl", "image_url", "url", "image_name", "img_name")  # the last two: VQA-RAD's, SLAKE's
LABEL_COLUMNS = ("label", "class", "class_name", "category", "diagnosis", "target")
TEXT_COLUMNS = ("text", "caption", "report", "findings", "description", "answer", "target")
SPLIT_COLUMNS = ("split", "subset", "fold")
TRAIN_NAMES = ("train", "training")
TEST_NAMES = ("test", "testing")
VAL_NAMES = ("val", "valid", "validation", "dev", "eval")


def _split_of(value: str, train_names: Sequence[str], test_names: Sequence[str]) -> str | None:
    """'train', 'test', 'val' or None for a split value / folder name (any case)."""
    v = str(value).strip().casefold()
    if v in {n.casefold() for n in (*TRAIN_NAMES, *train_names)}:
        return "train"
    if v in {n.casefold() for n in (*TEST_NAMES, *test_names)}:
        return "test"
    if v in VAL_NAMES:
        return "val"
    return None


def _unknown_splits(where: str, split_col: str | None, bad: Counter) -> DataError:
    """The error for split values that are neither train, test nor validation (listings of any format)."""
    shown = ", ".join(f"{k!r} ({v})" for k, v in bad.most_common(5))
    return DataError(f"{where}: unknown values in split column '{split_col}': {shown}. Use train or test "
                     "(val/validation/dev count as test when there is no test).")


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str,
                 flag: str) -> str:
    """The column named `wanted` (exact, then ignoring case), or the first candidate present."""
    if wanted:
        if wanted in columns:
            return wanted
        folded = {c.casefold(): c for c in columns}
        if wanted.casefold() in folded:
            return folded[wanted.casefold()]
        close = difflib.get_close_matches(wanted, list(columns), n=1)
        raise DataError(f"{where} has no {what} column '{wanted}' (columns: {', '.join(columns)})."
                        + (f" Did you mean '{close[0]}'?" if close else "") + f" Set {flag} to one of its columns.")
    folded = {c.casefold(): c for c in columns}
    for candidate in candidates:
        if candidate in folded:
            return folded[candidate]
    raise DataError(f"{where}: no {what} column found (looked for {', '.join(candidates)}; columns: "
                    f"{', '.join(columns)}). Set {flag} to the column that holds it.")


def template_fields(template: str) -> list[str]:
    """Field names used by a str.format template ("{title} {price}" -> ["title", "price"])."""
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field]
    except ValueError as exc:
        raise ConfigError(f"Target template {template!r} is not a valid format string ({exc}). "
                          "Use {column} placeholders; write {{ and }} for literal braces.") from exc


def _apply_aliases(row: Mapping[str, Any], aliases: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Row values, with each aliased name taken from the first of its columns (in the given order) that the
    row fills; a name not among its own aliases is tried last. Column names match ignoring case."""
    out = dict(row)
    folded = {str(k).casefold(): k for k in row}
    for name, options in aliases.items():
        order = list(options) + ([name] if name not in options else [])
        for option in order:
            key = folded.get(option.casefold())
            if key is not None and row[key] not in (None, ""):
                out[name] = row[key]
                break
    return out


def _format_target(template: str, row: Mapping[str, Any]) -> str:
    values = {k: ("" if v is None else str(v).strip()) for k, v in row.items()}
    return template.format_map(values).strip()


def _check_template(template: str, columns: Sequence[str], aliases: Mapping[str, Sequence[str]], where: str) -> None:
    have = {c.casefold() for c in columns}
    missing = []
    for field in template_fields(template):
        options = (field, *aliases.get(field, ()))
        if not any(o.casefold() in have for o in options):
            missing.append(field if len(options) == 1 else f"{field} (or {', '.join(options[1:])})")
    if missing:
        raise DataError(f"{where}: the target template {template!r} needs columns that are missing: "
                        f"{', '.join(missing)} (columns: {', '.join(columns)}). "
                        "Rename the columns or change the template.")


def _split_column(columns: Sequence[str], split_column: str | None) -> str | None:
    if not split_column:
        return None
    folded = {c.casefold(): c for c in columns}
    return folded.get(split_column.casefold()) or (
        next((folded[c] for c in SPLIT_COLUMNS if c in folded), None) if split_column == "split" else None)


def _vqa_columns(columns: Sequence[str], names: Mapping[str, str | None], where: str) -> dict[str, str | None]:
    """The question/answer columns (required) and the answer-type / image-group columns (when present)."""
    folded = {c.casefold(): c for c in columns}
    out: dict[str, str | None] = {
        "question": _pick_column(columns, names.get("question") or "question", (), "question", where,
                                 "--question_column"),
        "answer": _pick_column(columns, names.get("answer") or "answer", (), "answer", where, "--answer_column")}
    for key, default in (("answer_type", "answer_type"), ("image_group", "image_group")):
        wanted = names.get(key) or default
        if names.get(key) and wanted.casefold() not in folded:
            _pick_column(columns, wanted, (), key.replace("_", "-"), where, f"--{key}_column")  # raises, with columns
        out[key] = folded.get(wanted.casefold())
    return out
