"""Conversations to token ids, the same way for training, scoring and generation.

Three rules hold everywhere in the package:
- The chat template renders the BOS token, so the processor must not add another
  (`add_special_tokens=False`).
- The answer is the assistant text plus the family's end-of-turn token; loss and label scores
  cover exactly those tokens (`answer_span`).
- Nothing is ever truncated: a sample longer than `max_seq_length` is an error naming it, because
  cutting inside the image tokens silently breaks the image/token alignment.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

from ..errors import SampleTooLongError
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


def render(processor: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The chat template applied to one conversation, as text (image placeholders included)."""
    # Image objects stay out of the template call: only the placeholder matters for the text.
    bare = [
        {**m, "content": [{k: v for k, v in c.items() if k != "image"} for c in m["content"]]}
        if isinstance(m.get("content"), list) else m
        for m in messages
    ]
    return processor.apply_chat_template(bare, tokenize=False, add_generation_prompt=add_generation_prompt)


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


def assistant_spans(processor: Any, family: Family, messages: list[dict], images: list, input_ids: Sequence[int],
                    length: int, sample_id: str = "") -> list[tuple[int, int]]:
    """[start, end) of every assistant answer (text + end-of-turn) in one right-padded encoded conversation.

    The last answer ends the sequence. An earlier one ends where the conversation cut right after it
    ends: that prefix is encoded with its own images (image tokens expand) to find its length, and
    `answer_span` checks the answer tokens really sit there."""
    from ..data.samples import count_images, text_of

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
        target = answer_ids(processor, family, text_of(messages[turn]))
        spans.append(answer_span(input_ids, end, target, trailing_ids(processor, family, text), sample_id))
    return spans


def check_length(length: int, max_seq_length: int, sample_id: str, image_size: int | None) -> None:
    if length > max_seq_length:
        raise SampleTooLongError(
            f"Sample {sample_id} needs {length} tokens (image + text), more than max_seq_length={max_seq_length}. "
            f"Lower --image_size (now {image_size}) to use fewer image tokens, or raise --max_seq_length."
        )
