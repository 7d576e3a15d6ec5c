"""The one sample model: a list of images and a conversation (system / user / assistant turns).

Every loaded row keeps `image` (its first image), `target` (the last assistant answer, the one
evaluation scores) and `id`. A row may add:
- `messages`: the conversation as JSON text, a list of {"role", "content": [{"type": "image"} |
  {"type": "text", "text": ...}]}; image parts take the row's images in order;
- `more_images`: JSON text, the paths of its images after the first;
- any other column (`question`, `answer_type`, `image_group`, ...), which instructions can name as
  `{question}`.
A row without `messages` is the single turn "images, the recipe's instruction -> target": that is
what classification and captioning build, unchanged.
"""
from __future__ import annotations

import hashlib
import json
import string
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, DataError

# Columns every loader writes; instruction placeholders may name these or any extra column.
CORE_COLUMNS = ("image", "target", "id")
CLOSED_ANSWERS = ("yes", "no", "是", "否")  # SLAKE asks in English and Chinese


def placeholders(instruction: str) -> list[str]:
    """The {column} names an instruction uses, in order ({labels} is the recipe's, not a column)."""
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(instruction) if field]
    except ValueError as exc:
        raise ConfigError(f"Instruction {instruction!r} is not a valid template ({exc}). Use {{column}} placeholders; "
                          "write {{{{ and }}}} for literal braces.") from exc
    return [name for name in dict.fromkeys(names) if name != "labels"]


def check_placeholders(instruction: str, columns: Sequence[str], where: str = "the data") -> None:
    """ConfigError, listing the columns, when the instruction names a column the data does not have."""
    unknown = [name for name in placeholders(instruction) if name not in columns]
    if unknown:
        raise ConfigError(
            f"The instruction names {', '.join('{' + n + '}' for n in unknown)}, which is not a column of {where} "
            f"(columns: {', '.join(c for c in columns if c not in ('messages', 'more_images'))}). Use one of them, or "
            "write {{ and }} for literal braces."
        )


def fill(instruction: str, row: Mapping[str, Any]) -> str:
    """The instruction with each {column} replaced by the row's value (no placeholder: returned as is)."""
    names = placeholders(instruction)
    if not names:
        return instruction
    values = {name: "" if row.get(name) is None else str(row[name]) for name in names}
    return instruction.format_map({**values, "labels": "{labels}"})


def image_refs(row: Mapping[str, Any]) -> list[Any]:
    """The row's images, in order: `image`, then `more_images`."""
    more = row.get("more_images") or "[]"
    return [row["image"], *(json.loads(more) if isinstance(more, str) else more)]


def stored_messages(row: Mapping[str, Any]) -> list[dict] | None:
    """The row's own conversation (parsed `messages`), or None for a single-turn row."""
    text = row.get("messages")
    return json.loads(text) if text else None


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if part.get("type") == "image")


def with_images(messages: Sequence[Mapping[str, Any]], images: Sequence[Any]) -> list[dict]:
    """A copy of the messages whose image parts carry `images` in order (None entries: left bare)."""
    pending = iter(images)
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [dict(part, image=next(pending, None)) if part.get("type") == "image" else dict(part)
                       for part in content]
        out.append({**message, "content": content})
    return out


def single_turn(images: Sequence[Any], instruction: str, answer: str | None) -> list[dict]:
    """user: the images then the instruction; assistant: the answer (left out when None)."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": instruction}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def answers(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The text of every assistant turn, in order."""
    return [text_of(m) for m in messages if m["role"] == "assistant"]


def text_of(message: Mapping[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def closed_or_open(answer: str) -> str:
    """The answer type a VQA row gets when its data has no answer-type column: yes/no answers are closed."""
    return "closed" if str(answer).strip().strip(".。!！").casefold() in CLOSED_ANSWERS else "open"


def check_image_count(family_name: str, n_images: int, sample_id: str) -> None:
    """Families that take one image per conversation refuse more, naming the sample."""
    if family_name == "mllama" and n_images > 1:
        raise DataError(
            f"Sample {sample_id} has {n_images} images, and Llama 3.2 Vision (mllama) takes one image per "
            "conversation. Split the sample into one conversation per image, or use a family that takes several "
            "images (Ministral 3 / Mistral 3, Qwen2.5-VL)."
        )


def pack_questions(dataset, instruction: str):
    """Rows that ask about the same images (and carry no conversation of their own) as one row each: a multi-turn
    conversation, the images and the first question in the first user turn, every answer an assistant turn
    (each trained on, as a listing's conversations are). Row order is kept by each group's first row; a group of
    one stays as it was. Returns (a datasets.Dataset of the packed rows, how many rows went into how many).

    Columns that carry bytes (images embedded in the data: an Image feature) are read and written a chunk of rows
    at a time (images.IMAGE_CHUNK_ROWS), never all of a split's images at once: rows compare by a digest of the
    image's value, and each packed row's image comes from its group's first row."""
    import datasets

    from .images import IMAGE_CHUNK_ROWS, holds_bytes

    columns = dataset.column_names
    heavy = [c for c in columns
             if c not in ("messages", "target", "question", "id") and holds_bytes(dataset.features[c])]
    rows = dataset.select_columns([c for c in columns if c not in heavy]).to_list() if heavy else dataset.to_list()
    first_refs = _digests(dataset, "image", IMAGE_CHUNK_ROWS) if "image" in heavy else None
    groups: dict[str, list[int]] = {}
    for k, row in enumerate(rows):
        if row.get("messages"):
            key = f"own:{k}"
        else:
            refs = image_refs({**row, "image": None} if first_refs else row)
            parts = [str(ref) for ref in refs]
            if first_refs:
                parts[0] = first_refs[k]
            key = "\0".join(parts)
        groups.setdefault(key, []).append(k)
    packed = []
    for members in groups.values():
        first = rows[members[0]]
        if len(members) == 1:
            packed.append(first)
            continue
        n_images = len(image_refs({**first, "image": None}))
        messages = []
        for n, row in enumerate(rows[k] for k in members):
            images = [{"type": "image"} for _ in range(n_images)] if n == 0 else []
            messages.append({"role": "user", "content": images + [{"type": "text", "text": fill(instruction, row)}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": str(row["target"])}]})
        last = rows[members[-1]]
        packed.append({**{c: first.get(c) for c in columns}, "messages": json.dumps(messages),
                       "target": str(last["target"]), "question": last.get("question", ""),
                       "id": f"{first['id']}+{len(members) - 1}"})
    names = list(dict.fromkeys([*columns, "messages"]))
    features = datasets.Features({name: dataset.features.get(name, datasets.Value("string")) for name in names})
    light = [name for name in names if name not in heavy]
    table = {name: [row.get(name) if row.get(name) is not None else "" for row in packed] for name in light}
    out = datasets.Dataset.from_dict(table, features=datasets.Features({name: features[name] for name in light}))
    if heavy:  # added as Arrow columns: Dataset.from_dict would hash (pickle) all their bytes for its fingerprint
        firsts = [members[0] for members in groups.values()]
        for name in heavy:
            fingerprint = hashlib.sha1(f"{out._fingerprint}|pack_questions|{name}".encode()).hexdigest()[:16]
            out = out.add_column(name, _chunked_column(dataset, name, firsts, features[name], IMAGE_CHUNK_ROWS),
                                 new_fingerprint=fingerprint, feature=features[name])
        out = out.select_columns(names)
    return out, {"rows": len(rows), "samples": len(packed)}


def _digests(dataset, column: str, chunk: int) -> list[str]:
    """Per row, a digest of str(value) of a column that carries bytes (read `chunk` rows at a time): equal values,
    equal digests, as their str() would be."""
    part = dataset.select_columns([column])
    out = []
    for start in range(0, len(part), chunk):
        out += [f"\1sha256:{hashlib.sha256(str(row[column]).encode('utf-8', 'surrogatepass')).hexdigest()}"
                for row in part.select(range(start, min(start + chunk, len(part)))).to_list()]
    return out


def _chunked_column(dataset, column: str, rows: Sequence[int], feature, chunk: int):
    """The Arrow column Dataset.from_dict makes of the values `dataset[column]` holds at `rows` (None written as
    "", as pack_questions writes every column), converted as from_dict converts them, `chunk` rows at a time."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import OptimizedTypedSequence

    part = dataset.select_columns([column]).select(rows)
    features = datasets.Features({column: feature})
    pieces: list = []
    for start in range(0, len(part), chunk):
        values = [row[column] if row[column] is not None else ""
                  for row in part.select(range(start, min(start + chunk, len(part)))).to_list()]
        array = pa.array(OptimizedTypedSequence(features.encode_column(values, column), type=feature, col=column))
        pieces += array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    return pa.chunked_array(pieces, type=pieces[0].type) if pieces else []
