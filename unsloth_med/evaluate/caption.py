"""Greedy generation over a test split, and the captioning metrics (BLEU, ROUGE-L).

Generation is shared with classification's "generate" mode: prompts are the training conversation
cut just before the answer (so evaluation sees exactly the text the model was trained on), batched
with left padding, decoded greedily, and stopped at the family's end-of-turn token.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..data import samples
from ..data.images import load_image
from ..distributed import gather_in_order, my_shard
from ..models import prompting
from ..models.families import Family, family_of

log = logging.getLogger(__name__)

_SENTINEL = "\x00UNSLOTH_MED_ANSWER\x00"


# ----------------------------------------------------------------------------- shared helpers
def prompt_text(processor: Any, recipe, row: dict | None = None) -> str:
    """The rendered prompt of a row (its question, its earlier turns) exactly as training renders it, up to
    where the (last) answer starts.

    It is cut from a rendered training conversation rather than taken from `add_generation_prompt`,
    so scoring and generation see the same tokens as the trainer, whatever the template does.
    """
    full = prompting.render(processor, recipe.answered(row, _SENTINEL))
    if _SENTINEL in full:
        return full.split(_SENTINEL, 1)[0]
    return prompting.render(processor, recipe.prompt(example=row), add_generation_prompt=True)


def row_prompts(processor: Any, recipe, rows: Sequence[dict], prompt: str | None = None) -> list[str]:
    """One rendered prompt per row (`prompt`, when given, for all of them)."""
    return [prompt] * len(rows) if prompt is not None else [prompt_text(processor, recipe, row) for row in rows]


def row_images(rows: Sequence[dict], image_size) -> list[list]:
    """The decoded images of each row, in order (decoded in threads on a machine with cores to spare: PIL releases
    the GIL while it decodes)."""
    refs = [samples.image_refs(row) for row in rows]
    flat = [ref for row_refs in refs for ref in row_refs]
    if len(flat) >= 8 and (os.cpu_count() or 1) > 4:
        with ThreadPoolExecutor(max_workers=min(8, len(flat))) as pool:
            decoded = iter(list(pool.map(lambda ref: load_image(ref, image_size), flat)))
    else:
        decoded = iter([load_image(ref, image_size) for ref in flat])
    return [[next(decoded) for _ in row_refs] for row_refs in refs]


def encode_rows(processor: Any, recipe, rows: Sequence[dict], image_size, prompt: str | None = None) -> dict:
    """The prompts of `rows` with their images, tokenized and left-padded (on the CPU), ready for the model."""
    return prompting.encode(processor, row_prompts(processor, recipe, rows, prompt), row_images(rows, image_size),
                            padding_side="left")


class Prefetch:
    """`(item, prepare(item))` for each item, the next `ahead` prepared in a background thread while the caller
    works (the GPU computes one batch while the CPU decodes and tokenizes the next). Order is kept. With
    ahead=0 everything runs in the caller's thread (a CPU machine, where a second thread only competes).

    `stats`: seconds spent preparing and seconds the caller waited for a prepared item; a wait close to the
    preparation time means evaluation is bound by the CPU side, not the GPU."""

    def __init__(self, items: Iterable, prepare, ahead: int = 2):
        self.items, self.prepare, self.ahead = items, prepare, ahead
        self.stats = {"prepare_s": 0.0, "waited_s": 0.0, "batches": 0}

    def _timed(self, item):
        started = time.perf_counter()
        try:
            return self.prepare(item)
        finally:
            self.stats["prepare_s"] += time.perf_counter() - started

    def __iter__(self):
        if self.ahead <= 0:
            for item in self.items:
                started = time.perf_counter()
                prepared = self._timed(item)
                self.stats["waited_s"] += time.perf_counter() - started
                self.stats["batches"] += 1
                yield item, prepared
            return
        with ThreadPoolExecutor(max_workers=self.ahead) as pool:
            pending = deque()
            source = iter(self.items)
            for item in source:
                pending.append((item, pool.submit(self._timed, item)))
                if len(pending) > self.ahead:
                    yield self._next(pending)
            while pending:
                yield self._next(pending)

    def _next(self, pending):
        item, future = pending.popleft()
        started = time.perf_counter()
        prepared = future.result()
        self.stats["waited_s"] += time.perf_counter() - started
        self.stats["batches"] += 1
        return item, prepared

    def summary(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.stats.items()}


def prefetch_depth(model) -> int:
    """Batches prepared ahead: 2 when the model runs on a GPU, none on a CPU."""
    device, _ = model_device_dtype(model)
    return 2 if device.type == "cuda" else 0


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    if not isinstance(device, torch.device) or not isinstance(dtype, torch.dtype):
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # quantized weights
    return device, dtype


def to_model(batch, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors onto the model's device; floating inputs (pixels) in the model's dtype."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        out[key] = value
    return out


def batches(dataset, batch_size: int) -> Iterator[list[dict]]:
    """Rows of a datasets.Dataset or a list of dicts, `batch_size` at a time (decoded lazily)."""
    n = len(dataset)
    for start in range(0, n, max(1, batch_size)):
        yield [dataset[i] for i in range(start, min(start + batch_size, n))]


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def stop_token_ids(model, processor, family: Family) -> list[int]:
    """The family's end-of-turn token plus whatever the checkpoint already stops on."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None:
            ids.append(int(value))
    end = tokenizer.convert_tokens_to_ids(family.response_end)
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.append(end)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


class eval_mode:
    """Put the model in eval mode for the block and restore its previous mode after."""

    def __init__(self, model):
        self.model, self.was_training = model, bool(getattr(model, "training", False))

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()
        return False


# ----------------------------------------------------------------------------- generation
def generate_texts(model, processor, recipe, rows: Sequence[dict], *, max_new_tokens: int,
                   image_size: int | None = None, family: Family | None = None,
                   prompt: str | None = None, encoded: dict | None = None) -> list[str]:
    """Greedy answers for a batch of rows {image, ...}: left padding, new tokens only, special tokens dropped.
    `encoded`: the batch from `encode_rows`, when already prepared. Runs in inference mode (generate_batch)."""
    return generate_batch(model, processor, recipe, rows, max_new_tokens=max_new_tokens, image_size=image_size,
                          family=family, prompt=prompt, encoded=encoded)[0]


@torch.inference_mode()
def generate_batch(model, processor, recipe, rows: Sequence[dict], *, max_new_tokens: int,
                   image_size: int | None = None, family: Family | None = None,
                   prompt: str | None = None, encoded: dict | None = None) -> tuple[list[str], list[int]]:
    """generate_texts' answers, and how many tokens the model generated for each (generated_token_counts)."""
    family = family or family_of(model.config)
    tokenizer = getattr(processor, "tokenizer", processor)
    batch = encoded if encoded is not None else encode_rows(processor, recipe, rows, image_size, prompt)
    device, dtype = model_device_dtype(model)
    inputs = to_model(batch, device, dtype)
    stops = stop_token_ids(model, processor, family)
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
        temperature=None, top_p=None, top_k=None,
    )
    new = out[:, inputs["input_ids"].shape[1]:]
    texts = [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts, generated_token_counts(new, stops)


def generated_token_counts(new: torch.Tensor, stops: Sequence[int]) -> list[int]:
    """Tokens each row generated: up to and including its first stop token (generate pads a finished row after
    it), else all of them. Counted on the ids, not by re-tokenizing the decoded text, which drops special tokens
    and does not give back the same tokens."""
    if new.numel() == 0:
        return [0] * int(new.shape[0])
    stopped = torch.isin(new, torch.tensor(list(stops), device=new.device, dtype=new.dtype))
    first = torch.where(stopped.any(dim=1), stopped.int().argmax(dim=1) + 1, new.shape[1])
    return [int(n) for n in first.tolist()]


def generate_all(model, processor, recipe, dataset, *, max_new_tokens: int, batch_size: int = 8,
                 image_size: int | None = None, progress: bool = True, desc: str = "generate",
                 stats: dict | None = None) -> Iterator[tuple[dict, str]]:
    """(row, answer) for every row, one batch at a time; nothing but the answers is kept. `stats` receives the
    input pipeline's timings and the number of generated tokens."""
    family = family_of(model.config)
    feed = Prefetch(batches(dataset, batch_size), lambda rows: encode_rows(processor, recipe, rows, image_size),
                    ahead=prefetch_depth(model))
    tokens = 0
    with eval_mode(model), progress_bar(len(dataset), desc, progress) as bar:
        for rows, encoded in feed:
            answers, counts = generate_batch(model, processor, recipe, rows, max_new_tokens=max_new_tokens,
                                             image_size=image_size, family=family, encoded=encoded)
            tokens += sum(counts)
            bar.update(len(rows))
            yield from zip(rows, answers)
    if stats is not None:
        stats.update(feed.summary(), generated_tokens=tokens)


# ----------------------------------------------------------------------------- metrics
def caption_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-L F-measure (0-1).

    No BERTScore: its model (roberta-large) cannot be fetched offline and nothing here tests it, so it is
    not offered. A recipe's `score_text` can add it (or any metric) where its model is available."""
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = [str(p) for p in predictions]
    references = [str(r) for r in references]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    metrics: dict[str, Any] = {"n": len(predictions)}
    if not predictions:
        metrics.update(bleu=0.0, rougeL=0.0)
        return metrics
    metrics["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    metrics["rougeL"] = float(sum(scores) / len(scores))
    return metrics


@torch.inference_mode()  # as evaluate() runs it; here too for callers that call it directly
def evaluate_captioning(model, processor, recipe, dataset, *, batch_size: int = 8, max_new_tokens: int | None = None,
                        image_size: int | None = None, progress: bool = True) -> dict:
    """Greedy captions for the whole split, scored against the references."""
    max_new_tokens = max_new_tokens or recipe.max_new_tokens
    dataset, rows = my_shard(dataset, batch_size)  # under DDP: this rank's batches; all gathered below
    predictions, stats = [], {}
    started = time.perf_counter()
    for row, answer in generate_all(model, processor, recipe, dataset, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, image_size=image_size, progress=progress,
                                    desc="evaluate (captions)", stats=stats):
        predictions.append({"id": str(row.get("id", len(predictions))), "target": recipe.target(row),
                            "prediction": answer})
    predictions = gather_in_order(predictions, rows)
    metrics = caption_metrics([p["prediction"] for p in predictions], [p["target"] for p in predictions])
    score_text = getattr(recipe, "score_text", None)  # recipe-specific metrics (product_catalog: fields, price MAE)
    if callable(score_text):
        metrics.update(score_text([p["prediction"] for p in predictions], [p["target"] for p in predictions]))
    metrics.update(mode="generate", max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - started  # this rank's generation: its tokens over its time
    stats["generated_tokens_per_second"] = round(stats.get("generated_tokens", 0) / seconds, 1) if seconds else None
    return {"metrics": metrics, "predictions": predictions, "input_pipeline": stats}


def examples_table(predictions: Iterable[dict], limit: int = 8, width: int = 160) -> str:
    """A markdown table of predictions next to their references."""
    def cell(text: Any) -> str:
        text = " ".join(str(text).split()).replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = ["| id | reference | prediction |", "|---|---|---|"]
    for i, p in enumerate(predictions):
        if i >= limit:
            break
        lines.append(f"| {cell(p.get('id', i))} | {cell(p.get('target', ''))} | {cell(p.get('prediction', ''))} |")
    return "\n".join(lines)
