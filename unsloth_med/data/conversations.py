"""Per-row converters into the sample model (data/samples.py): VQA columns and conversation formats.

- **Question/answer columns** (VQA-RAD, SLAKE, PathVQA): one row per question; the answer is the
  target, the question stays a column that the instruction names (`{question}`), an optional
  answer-type column (closed/open; yes/no answers are closed when it is absent) and an optional
  image-group column (which rows show the same image, for `--split_by image`).
- **LLaVA / ShareGPT** `conversations`: [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}],
  with `image` (one path, or a list of them) or `images` (several); each `<image>` marks where an image goes.
- **OpenAI / HF** `messages`: [{"role", "content": "text" | [{"type": "text", "text"} | {"type": "image",
  "image": path?} | {"type": "image_url", "image_url": {"url"} or url}]}]; images come from the parts or
  from an `images` column (string content may mark them with `<image>`, as LLaMA-Factory writes them).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from ..errors import DataError
from .samples import closed_or_open, count_images, text_of

CONVERSATION_COLUMNS = ("messages", "conversations")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}
IMAGE_MARK = "<image>"


def conversation_column(columns: Sequence[str]) -> str | None:
    return next((c for c in CONVERSATION_COLUMNS if c in columns), None)


def _parts(text: str, images_left: list[int]) -> list[dict]:
    """ShareGPT text -> content parts, one image part per <image> mark."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_MARK)):
        if i:
            parts.append({"type": "image"})
            images_left[0] -= 1
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _content(content: Any, found: list[str], where: str) -> list[dict]:
    """OpenAI/HF content -> content parts; image paths/URLs inside the parts are appended to `found`."""
    if isinstance(content, (int, float)):  # a number written as the answer (VQA-RAD's counts): its text, 0 too
        content = str(content)
    if isinstance(content, str):
        # LLaMA-Factory's multimodal `messages`: string content whose <image> marks place the `images`
        return _parts(content, [0]) if IMAGE_MARK in content else [{"type": "text", "text": content.strip()}]
    if content is not None and not isinstance(content, list):
        raise DataError(f"{where}: content is a {type(content).__name__} ({str(content)[:40]!r}): write it as text, or "
                        'as a list of parts ({"type": "text", "text": ...}, {"type": "image", "image": path}).')
    parts = []
    for part in content or []:
        if not isinstance(part, dict):
            raise DataError(f"{where}: a content part is a {type(part).__name__} ({str(part)[:40]!r}), not an object. "
                            'Write each part as {"type": "text", "text": ...} or {"type": "image", "image": path}, '
                            "or give the whole content as one string.")
        kind = part.get("type")
        if kind == "text":
            # Stripped, as ShareGPT turns are: some chat templates trim text (Gemma 3's own), others glue a leading
            # newline to their header's, so an answer's tokens as written would not be the tokens trained.
            text = part.get("text")  # null is no text; a number (0 too) is its digits
            parts.append({"type": "text", "text": "" if text is None else str(text).strip()})
        elif kind in ("image", "image_url"):
            url = part.get("image_url")  # {"url": ...}, or the URL itself (some exporters write it bare)
            ref = (part.get("image") or part.get("path") or part.get("url")
                   or (url.get("url") if isinstance(url, dict) else url))
            if isinstance(ref, str) and ref:
                found.append(ref)
            parts.append({"type": "image"})
    return parts


def to_messages(record: Mapping[str, Any], column: str, where: str) -> tuple[list[dict], list[str]]:
    """(messages in the sample model, image references found inside them) for one record."""
    raw = record[column]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: column '{column}' is not a JSON list of turns ({exc.msg}).") from exc
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: column '{column}' must hold a list of turns.")
    messages, found = [], []
    for turn in raw:
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: turn {len(messages) + 1} of '{column}' is a {type(turn).__name__} "
                            f"({str(turn)[:40]!r}), not an object. Write each turn as {{\"role\": ..., \"content\": "
                            "...} (OpenAI) or {\"from\": ..., \"value\": ...} (ShareGPT).")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise DataError(f"{where}: unknown speaker {turn.get('from', turn.get('role'))!r} in '{column}' "
                            f"(use one of {', '.join(ROLES)}).")
        if "value" in turn:  # a null value is an empty turn, not the text "None"
            content = _parts("" if turn["value"] is None else str(turn["value"]), [0])
        else:
            content = _content(turn.get("content"), found, f"{where}, '{column}' turn {len(messages) + 1}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: a conversation without an assistant turn has nothing to train on.")
    return messages, found


def images_of(record: Mapping[str, Any], image_column: str | None, found: Sequence[str]) -> list[str]:
    """The record's images: an `images` list column, else its image column, else the paths inside its turns."""
    value = _image_list(record.get("images"))
    if isinstance(value, list) and value:
        return [str(v) for v in value]
    if image_column and record.get(image_column) not in (None, ""):
        value = _image_list(record[image_column])  # LLaVA-OneVision: "image": ["a.jpg", "b.jpg"]
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return list(found)


def _image_list(value: Any) -> Any:
    """A cell that lists images: a list, or its JSON text (a CSV cell); other values as they are."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # a file name that starts with '['
    return value


def conversation_row(record: Mapping[str, Any], column: str, image_column: str | None, where: str) -> dict | None:
    """{image, more_images, messages, target, question}: one conversation row, or None without an image."""
    messages, found = to_messages(record, column, where)
    images = images_of(record, image_column, found)
    if not images:
        return None
    placed = count_images(messages)
    if placed == 0:  # no <image> mark: the images open the first user turn
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
    elif placed != len(images):
        raise DataError(f"{where}: the conversation marks {placed} images and the row has {len(images)}. "
                        "Give one <image> mark (or image part) per image.")
    if messages[-1]["role"] != "assistant":
        messages = messages[:max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
    users = [text_of(m) for m in messages if m["role"] == "user"]
    return {"image": images[0], "more_images": json.dumps(images[1:]), "messages": json.dumps(messages),
            "target": text_of(messages[-1]), "question": users[-1] if users else ""}


def vqa_fields(record: Mapping[str, Any], *, question: str, answer: str, answer_type: str | None,
               image_group: str | None) -> dict:
    """The VQA columns of one question/answer record (answer type inferred from the answer when absent)."""
    text = "" if record.get(answer) is None else str(record[answer]).strip()
    kind = str(record.get(answer_type) or "").strip().lower() if answer_type else ""
    kind = {"yes/no": "closed", "closed": "closed", "open": "open"}.get(kind, "") or closed_or_open(text)
    fields = {"question": "" if record.get(question) is None else str(record[question]).strip(), "answer_type": kind}
    if image_group and record.get(image_group) not in (None, ""):
        fields["image_group"] = str(record[image_group])
    return fields
