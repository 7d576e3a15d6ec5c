"""Conversations to token ids, the same way for training, scoring and generation.

Three rules hold everywhere in the package:
- The chat template renders the BOS token, so the processor must not add another
  (`add_special_tokens=False`).
- The answer is the assistant text (as the chat template renders it: Gemma 3's own trims it) plus the
  family's end-of-turn token; loss and label scores cover exactly those tokens (`answer_span`).
- Nothing is ever truncated: a sample longer than `max_seq_length` is an error naming it, because
  cutting inside the image tokens silently breaks the image/token alignment.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

from ..errors import DataError, SampleTooLongError
from .families import Family


def prepare_processor(processor: Any, family: Family) -> Any:
    """Install the family's training chat template (unless the checkpoint's own is preferred)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if not family.use_own_template or not getattr(processor, "chat_template", None):
        processor.chat_template = family.chat_template
        tokenizer.chat_template = family.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def render(processor: Any, messages: list[dict], *, add_generation_prompt: bool = False, sample_id: str = "") -> str:
    """The chat template applied to one conversation, as text (image placeholders included).

    A template that refuses a conversation (Gemma 3's own: "Conversation roles must alternate", e.g. an image-only
    user turn followed by the question's user turn) is a DataError naming the sample and its roles, not a jinja
    traceback from inside the first training batch that holds it."""
    from jinja2.exceptions import TemplateError

    # Image objects stay out of the template call: only the placeholder matters for the text.
    bare = [
        {**m, "content": [{k: v for k, v in c.items() if k != "image"} for c in m["content"]]}
        if isinstance(m.get("content"), list) else m
        for m in messages
    ]
    try:
        return processor.apply_chat_template(bare, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        roles = " -> ".join(str(m.get("role")) for m in messages)
        raise DataError(
            f"{f'Sample {sample_id}: t' if sample_id else 'T'}his model's chat template refuses the conversation "
            f"(roles {roles}): {str(exc).rstrip('.')}. Write each sample as the template expects it (e.g. one "
            "user turn holding both the image and the question, user and assistant turns alternating)."
        ) from exc


# Evaluation encodes its next batches in threads (left padding) while the main thread may encode full sequences
# (right padding) for the packed check. The padding side is state the threads share: the tokenizer's attribute, and
# the fast tokenizer's padding direction in its Rust object, which every call sets. Without one encode at a time
# a prefetched batch came back right-padded (14 of 80 in a CPU reproduction) and was scored from a padding column.
_ENCODE_LOCK = threading.Lock()


def encode(processor: Any, texts: Sequence[str], images: Sequence[Any], *, padding_side: str = "right"):
    """Tokenize rendered texts with their images (one image, or a list of images, per text); a BatchFeature.
    One encode at a time in a process (_ENCODE_LOCK): the padding side is the processor's shared state."""
    tokenizer = getattr(processor, "tokenizer", processor)
    with _ENCODE_LOCK:
        old_side = tokenizer.padding_side
        tokenizer.padding_side = padding_side
        try:
            return processor(images=[im if isinstance(im, list) else [im] for im in images], text=list(texts),
                             add_special_tokens=False, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = old_side


def answer_ids(processor: Any, family: Family, answer: str) -> list[int]:
    """Token ids of an answer as the model must produce it: the text, then the end-of-turn token."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer(answer + family.response_end, add_special_tokens=False)["input_ids"]


def trailing_ids(processor: Any, family: Family, rendered: str) -> list[int]:
    """Ids the template renders after the end-of-turn token (e.g. Qwen's newline); never trained on."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tail = rendered.rsplit(family.response_end, 1)[-1]
    return tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []


def answer_span(input_ids: Sequence[int], length: int, target: Sequence[int], trailing: Sequence[int],
                sample_id: str = "") -> tuple[int, int]:
    """[start, end) of the answer tokens inside one right-padded sequence of `length` real tokens."""
    end = length - len(trailing)
    start = end - len(target)
    if start < 0 or list(input_ids[start:end]) != list(target):
        raise ValueError(
            f"Sample {sample_id}: the answer tokens were not found at the end of the sequence "
            f"(expected {list(target)}, found {list(input_ids[max(start, 0):end])}). The chat template and the "
            "family's response_end disagree; check models/families.py for this model."
        )
    return start, end


# Stands in for an answer to find where the template puts it: no template trims or escapes it (it is no whitespace).
_ANSWER_MARK = "\x00UNSLOTH_MED_ANSWER\x00"


def rendered_answer(processor: Any, family: Family, messages: list[dict], turn: int, rendered: str) -> str:
    """The text of assistant turn `turn` as the chat template writes it into `rendered` (the conversation cut right
    after that turn). A checkpoint's own template may change it: Gemma 3's trims every text part, so an answer
    "Yes.\n" is rendered, and trained, as "Yes."; its tokens must be looked for as rendered, not as written."""
    from ..data.samples import text_of

    marked = render(processor, messages[:turn] + [{"role": "assistant", "content": [{"type": "text",
                                                                                    "text": _ANSWER_MARK}]}])
    before = marked.split(_ANSWER_MARK, 1)[0]
    if _ANSWER_MARK not in marked or not rendered.startswith(before) or family.response_end not in rendered:
        return text_of(messages[turn])
    return rendered[len(before):].rsplit(family.response_end, 1)[0]


def assistant_spans(processor: Any, family: Family, messages: list[dict], images: list, input_ids: Sequence[int],
                    length: int, sample_id: str = "") -> list[tuple[int, int]]:
    """[start, end) of every assistant answer (text + end-of-turn) in one right-padded encoded conversation.

    The last answer ends the sequence. An earlier one ends where the conversation cut right after it
    ends: that prefix is encoded with its own images (image tokens expand) to find its length, and
    `answer_span` checks the answer tokens (the answer as the template renders it) really sit there."""
    from ..data.samples import count_images

    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for k, turn in enumerate(turns):
        prefix = messages[:turn + 1]
        text = render(processor, prefix)
        if k == len(turns) - 1:
            end = length
        else:
            n_images = count_images(prefix)
            encoded = processor(images=[images[:n_images]] if n_images else None, text=[text],
                                add_special_tokens=False, return_tensors="pt")
            end = int(encoded["attention_mask"].sum())
        target = answer_ids(processor, family, rendered_answer(processor, family, messages, turn, text))
        spans.append(answer_span(input_ids, end, target, trailing_ids(processor, family, text), sample_id))
    return spans


# What a chat template may add around a conversation's own text, in tokens (headers, a default system prompt like
# Llama 3.2's dated one): rows whose text + image tokens stay this far below max_seq_length are not tokenized.
TEMPLATE_SLACK = 256


def image_expansion(processor: Any, size: tuple[int, int], cache: dict | None = None) -> int:
    """Tokens an image of this (fitted) size adds to a rendered text beyond its placeholder's own: what the processor
    expands the placeholder into (Pixtral's rows of [IMG] and [IMG_BREAK], Qwen's image pads, Gemma 3's fixed 256),
    found by encoding a blank image of that size once; it depends on the size alone."""
    if cache is not None and size in cache:
        return cache[size]
    from PIL import Image

    text = render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    tokenizer = getattr(processor, "tokenizer", processor)
    plain = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    full = int(encode(processor, [text], [[Image.new("RGB", size)]])["attention_mask"].sum())
    if cache is not None:
        cache[size] = full - plain
    return full - plain


def _sizes(shape: Any) -> list[tuple[int, int]]:
    """'512x384+384x512' (the image_shape column preparation writes) -> [(512, 384), (384, 512)]."""
    sizes = []
    for item in str(shape or "").split("+"):
        width, _, height = item.partition("x")
        if width.isdigit() and height.isdigit():
            sizes.append((int(width), int(height)))
    return sizes


def samples_over_length(processor: Any, recipe: Any, dataset: Any, max_seq_length: int,
                        batch_size: int = 1024) -> list[tuple[str, int]]:
    """(id, tokens) of the training rows longer than max_seq_length, found before training: the collators find such
    a row only when a batch holds it, maybe hours in, and a --resume meets it again.

    A row's length is its rendered text's tokens plus what each of its images expands to at its prepared size
    (`image_expansion`, by the `image_shape` column; without it, nothing: a lower bound), as the collator counts
    it. Only rows that could be too long are tokenized: a token holds at least one byte of UTF-8 text."""
    from ..data.samples import image_refs

    tokenizer = getattr(processor, "tokenizer", processor)
    expansions: dict[tuple[int, int], int] = {}
    over = []
    for batch in dataset.iter(batch_size=batch_size):
        names = list(batch)
        for k in range(len(batch[names[0]]) if names else 0):
            row = {name: batch[name][k] for name in names}
            images = image_refs(row) if row.get("image") is not None else []
            added = sum(image_expansion(processor, size, expansions) for size in _sizes(row.get("image_shape")))
            conversation = recipe.to_conversation(row, images=[None] * len(images))
            if added + sum(len(text.encode()) for text in _texts(conversation)) + TEMPLATE_SLACK <= max_seq_length:
                continue
            length = len(tokenizer(render(processor, conversation), add_special_tokens=False)["input_ids"]) + added
            if length > max_seq_length:
                over.append((str(row.get("id", k)), length))
    return over


def _texts(conversation: list[dict]) -> list[str]:
    """Every text of a conversation: string contents and text parts."""
    texts = []
    for turn in conversation:
        content = turn.get("content")
        for part in content if isinstance(content, list) else [{"text": content}]:
            if isinstance(part, dict) and part.get("text"):
                texts.append(str(part["text"]))
    return texts


def check_sample_lengths(processor: Any, recipe: Any, dataset: Any, max_seq_length: int,
                         image_size: int | None) -> None:
    """SampleTooLongError before training when any training row is certain not to fit (`samples_over_length`)."""
    over = samples_over_length(processor, recipe, dataset, max_seq_length)
    if over:
        longest = max(over, key=lambda item: item[1])
        raise SampleTooLongError(
            f"{len(over)} of {len(dataset)} training samples need more than max_seq_length={max_seq_length} tokens "
            f"(image + text; up to {longest[1]}, sample {longest[0]}; e.g. "
            f"{', '.join(sample_id for sample_id, _ in over[:3])}). Found before training, as every batch holding one "
            f"would stop it: raise --max_seq_length, shorten or drop those samples, or lower --image_size (now "
            f"{image_size}) to use fewer image tokens.")


def check_length(length: int, max_seq_length: int, sample_id: str, image_size: int | None) -> None:
    if length > max_seq_length:
        raise SampleTooLongError(
            f"Sample {sample_id} needs {length} tokens (image + text), more than max_seq_length={max_seq_length}. "
            f"Lower --image_size (now {image_size}) to use fewer image tokens, or raise --max_seq_length."
        )
