"""Rows of a listing in a conversation format: LLaVA/ShareGPT `conversations` or OpenAI/HF `messages`
(the per-row conversion is data/conversations.py).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import DataError
from ..conversations import conversation_row
from ..samples import answers
from .columns import IMAGE_COLUMNS, _split_column, _split_of, _unknown_splits
from .holdout import _dedupe_ids
from .locations import image_location, is_data_url, is_url

log = logging.getLogger(__name__)


def _conversation_rows(records: Sequence[Mapping[str, Any]], columns: Sequence[str], chat_col: str, *, where: str,
                       base_dir: Path | None, image_column: str | None, split_column: str | None,
                       split_names: tuple[str, str]) -> tuple[list[dict], bool]:
    """Rows of a LLaVA/ShareGPT `conversations` or OpenAI/HF `messages` listing (data/conversations.py)."""
    image_col = next((c for c in ((image_column,) if image_column else IMAGE_COLUMNS) if c in columns), None)
    split_col = _split_column(columns, split_column)
    rows, dropped, empty, bad_splits = [], 0, 0, Counter()
    for number, record in enumerate(records, 1):
        row = conversation_row(record, chat_col, image_col, f"{where}, row {number}")
        if row is None:
            dropped += 1
            continue
        if not all(answer.strip() for answer in answers(json.loads(row["messages"]))):
            # an empty answer would train the model to say nothing, and score against nothing
            empty += 1
            continue
        # paths against the listing's folder; inline (data URL) images written once into the cache
        listed = str(row["image"]).strip()
        row["image"] = image_location(row["image"], base_dir)
        row["more_images"] = json.dumps([image_location(v, base_dir) for v in json.loads(row["more_images"])])
        value = str(record.get(split_col) or "").strip() if split_col else ""
        split = _split_of(value, split_names[:1], split_names[1:]) if value else None
        if value and split is None:  # named, not left empty: say which values (as question/answer listings do)
            bad_splits[value] += 1
            continue
        # A listing's row is named by its image as listed (patient3/view0.jpg, as question listings name theirs):
        # two patients' view0.jpg stay apart and a prediction leads back to its file. An inline image, a URL or a
        # dataset's image (bytes cached by content) by its file name.
        plain = base_dir is not None and not is_data_url(listed) and not is_url(listed)
        rows.append({**row, "id": str(record.get("id") or (listed if plain else Path(row["image"]).name)),
                     "split": split})
    if bad_splits:
        raise _unknown_splits(where, split_col, bad_splits)
    if dropped:
        log.warning("%s: %d conversations without an image were skipped", where, dropped)
    if empty:
        log.warning("%s: %d conversations with an empty assistant answer were skipped", where, empty)
    if not rows:
        raise DataError(f"{where}: no conversation has an image and an answer in every assistant turn.")
    _dedupe_ids(rows)
    return rows, split_col is not None
