"""Greedy generation over a test split, and the captioning metrics (BLEU, ROUGE-L).

Generation is shared with classification's "generate" mode and VQA: prompts from inputs.py (the training
conversation cut just before the answer), batched with left padding, decoded greedily, and stopped at the
family's end-of-turn token.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..distributed import gather_in_order, my_shard
from ..models.families import Family, family_of
from .inputs import (
    EncodedBatches,
    Prefetch,
    batches,
    encode_rows,
    encoder,
    eval_mode,
    model_device_dtype,
    prefetch_depth,
    progress_bar,
    to_model,
)
from .text import RougeTokenizer

log = logging.getLogger(__name__)


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
                   prompt: str | None = None,
                   encoded: dict | None = None) -> tuple[list[str], list[int], list[bool]]:
    """generate_texts' answers, how many tokens the model generated for each (generated_token_counts), and which
    answers were cut off at max_new_tokens before the model ended them (cut_off)."""
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
    return texts, generated_token_counts(new, stops), cut_off_rows(new, stops)


def cut_off_rows(new: torch.Tensor, stops: Sequence[int]) -> list[bool]:
    """Whether each row of generated ids holds no stop token: generation ended it at max_new_tokens in the middle
    of its answer (a caption cut short, a class name cut down to a shorter class's name)."""
    if new.numel() == 0:
        return [False] * int(new.shape[0])
    stopped = torch.isin(new, torch.tensor(list(stops), device=new.device, dtype=new.dtype))
    return [not bool(ended) for ended in stopped.any(dim=1).tolist()]


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
                 stats: dict | None = None,
                 inputs: EncodedBatches | None = None) -> Iterator[tuple[dict, str, bool]]:
    """(row, answer, cut off at max_new_tokens) for every row, one batch at a time; nothing but the answers is
    kept. `stats` receives the input pipeline's timings, the number of generated tokens and of answers cut off;
    `inputs` keeps encoded batches between passes."""
    family = family_of(model.config)
    feed = Prefetch(batches(dataset, batch_size), encoder(processor, recipe, image_size, inputs),
                    ahead=prefetch_depth(model))
    tokens = cut = 0
    with eval_mode(model), progress_bar(len(dataset), desc, progress) as bar:
        for rows, encoded in feed:
            answers, counts, cut_off = generate_batch(model, processor, recipe, rows, max_new_tokens=max_new_tokens,
                                                      image_size=image_size, family=family, encoded=encoded)
            tokens += sum(counts)
            cut += sum(cut_off)
            bar.update(len(rows))
            yield from zip(rows, answers, cut_off)
    if cut:  # scores of answers the budget cut short measure the budget, not the model
        log.warning("%d of %d answers were cut off at max_new_tokens=%d before the model ended them: raise "
                    "--max_new_tokens (cut_off in eval_*.json)", cut, len(dataset), max_new_tokens)
    if stats is not None:
        stats.update(feed.summary(), generated_tokens=tokens)


# ----------------------------------------------------------------------------- metrics
def caption_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-L F-measure (0-1; rouge_score, on text.py's words where the
    text is not ASCII).

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
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=RougeTokenizer())  # rouge_score's own for ASCII
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    metrics["rougeL"] = float(sum(scores) / len(scores))
    return metrics


@torch.inference_mode()  # as evaluate() runs it; here too for callers that call it directly
def evaluate_captioning(model, processor, recipe, dataset, *, batch_size: int = 8, max_new_tokens: int | None = None,
                        image_size: int | None = None, progress: bool = True,
                        inputs: EncodedBatches | None = None) -> dict:
    """Greedy captions for the whole split, scored against the references."""
    max_new_tokens = max_new_tokens or recipe.max_new_tokens
    dataset, rows = my_shard(dataset, batch_size)  # under DDP: this rank's batches; all gathered below
    predictions, stats = [], {}
    started = time.perf_counter()
    for row, answer, cut in generate_all(model, processor, recipe, dataset, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, image_size=image_size, progress=progress,
                                         desc="evaluate (captions)", stats=stats, inputs=inputs):
        predictions.append({"id": str(row.get("id", len(predictions))), "target": recipe.target(row),
                            "prediction": answer, "cut_off": cut})
    predictions = gather_in_order(predictions, rows)
    metrics = caption_metrics([p["prediction"] for p in predictions], [p["target"] for p in predictions])
    score_text = getattr(recipe, "score_text", None)  # recipe-specific metrics (product_catalog: fields, price MAE)
    if callable(score_text):
        metrics.update(score_text([p["prediction"] for p in predictions], [p["target"] for p in predictions]))
    metrics.update(mode="generate", max_new_tokens=max_new_tokens, cut_off=cut_off_count(predictions))
    seconds = time.perf_counter() - started  # this rank's generation: its tokens over its time
    stats["generated_tokens_per_second"] = round(stats.get("generated_tokens", 0) / seconds, 1) if seconds else None
    return {"metrics": metrics, "predictions": predictions, "input_pipeline": stats}


def cut_off_count(predictions: Sequence[dict]) -> int:
    """Answers generation cut off at max_new_tokens (their `cut_off`), for the metrics and the report."""
    return sum(1 for p in predictions if p.get("cut_off"))


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
