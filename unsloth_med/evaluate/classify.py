"""Classification: label scoring and generation, and the scikit-learn metrics.

Label scoring ranks every class by the model's log-likelihood of answering with it: the class name
plus the family's end-of-turn token, exactly the tokens training puts the loss on. The image is encoded
once per row, not once per class: by default (strategy "auto") every class's answer tokens are packed
after the prompt in one forward, each seeing only the prompt and its own class (packed.py), checked on the
first batch against one full sequence per class (once per model and attention path: a run's pass after training
reuses the check its pass before training passed); for the other families (Qwen2.5-VL, Mllama, Gemma 3) and flash
attention the prompt runs with the KV cache on and every class continuation is scored from a copy of that cache.
Probabilities are the softmax of these log-likelihoods over the classes, so they sum to 1 and no answer is
ever unparseable.

Generation decodes greedily and matches the answer to a class (exactly, then ignoring case and
whitespace); an answer that matches no class counts as wrong and is reported as unparseable.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import Counter, deque
from typing import Any, Sequence

import torch

from ..distributed import gather_in_order, my_shard
from ..errors import DataError
from ..models import prompting
from ..models.families import Family, family_of
from ..models.folding import free_memory_bytes
from .caption import cut_off_count, generate_all
from .inputs import (
    EncodedBatches,
    HostCopy,
    Prefetch,
    batches,
    encode_rows,
    encoder,
    eval_mode,
    model_device_dtype,
    pinned,
    prefetch_depth,
    progress_bar,
    prompt_text,
    row_images,
    to_model,
)
from .packed import can_pack, check_packed, first_rows, passed_check, remember_check, score_packed
from .uncertainty import intervals

log = logging.getLogger(__name__)

UNPARSEABLE = "(unparseable)"
_MROPE_FAMILIES = ("qwen2_5_vl",)  # 3-D rotary positions the model derives itself from the image grid
_MAX_CONTINUATION_ROWS = 16  # class continuations scored per forward on a CPU (at least one image's classes)
_MAX_GPU_CONTINUATION_ROWS = 512


# ----------------------------------------------------------------------------- labels
def dataset_labels(recipe, dataset) -> tuple[str, ...]:
    """The recipe's classes, or (generic recipes without a fixed list) the sorted targets of the split."""
    if recipe.labels:
        return tuple(recipe.labels)
    targets = dataset["target"] if hasattr(dataset, "column_names") else [row["target"] for row in dataset]
    return tuple(sorted({str(t) for t in targets}))


def normalize(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def match_label(answer: str, labels: Sequence[str]) -> str | None:
    """The class an answer names: exact match first, then ignoring case and whitespace; None if neither."""
    answer = str(answer)
    if answer in labels:
        return answer
    stripped = answer.strip()
    if stripped in labels:
        return stripped
    wanted = normalize(answer)
    for label in labels:
        if normalize(label) == wanted:
            return label
    return None


# ----------------------------------------------------------------------------- label scoring
def label_token_ids(processor: Any, family: Family, labels: Sequence[str]) -> list[list[int]]:
    return [prompting.answer_ids(processor, family, label) for label in labels]


def check_label_tokenization(processor: Any, family: Family, recipe, prompt: str, labels: Sequence[str],
                             ids: Sequence[Sequence[int]], row: dict | None = None) -> None:
    """Prompt tokens + answer tokens must equal the tokens of the whole training text, or scores would
    be of sequences the model never sees. Checked on the text alone (no image), once per evaluation."""
    tokenizer = getattr(processor, "tokenizer", processor)
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for label, answer in zip(labels, ids):
        full = prompting.render(processor, recipe.answered(row, label))
        whole = tokenizer(full, add_special_tokens=False)["input_ids"]
        trailing = prompting.trailing_ids(processor, family, full)
        if whole != head + list(answer) + list(trailing):
            raise DataError(
                f"Label scoring: the tokens of class '{label}' change when it follows the prompt (the tokenizer "
                "merges across the boundary), so it cannot be scored from the prompt's cache. Use --eval_mode "
                "generate, or score with strategy='full'."
            )


def _select_rows(cache, index: torch.Tensor):
    """A copy of `cache` holding the rows `index` (repeats allowed); the original stays untouched."""
    sub = copy.copy(cache)
    sub.layers = [copy.copy(layer) for layer in cache.layers]
    sub.batch_select_indices(index)
    return sub


@torch.inference_mode()
def score_rows(model, processor, recipe, rows: Sequence[dict], labels: Sequence[str], *, image_size: int | None = None,
               strategy: str = "cache", family: Family | None = None, prompt: str | None = None,
               ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Summed log-likelihood (float64, shape [len(rows), len(labels)]) of each class as the answer to each row."""
    family = family or family_of(model.config)
    ids = ids if ids is not None else label_token_ids(processor, family, labels)
    if strategy == "full":
        return torch.stack([_score_full(model, processor, recipe, family, row, image, labels)
                            for row, image in zip(rows, row_images(rows, image_size))])
    if strategy not in ("cache", "packed"):
        raise ValueError(f"unknown label-scoring strategy {strategy!r} (use 'cache', 'packed' or 'full')")
    encoded = encode_rows(processor, recipe, rows, image_size, prompt)
    score = score_packed if strategy == "packed" else score_encoded
    return score(model, processor, family, encoded, ids)


def score_encoded(model, processor, family: Family, encoded: dict, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """score_rows' cached strategy on a batch already encoded (`inputs.encode_rows`)."""
    device, dtype = model_device_dtype(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = to_model(encoded, device, dtype)
    n_rows = int(batch["input_ids"].shape[0])
    mask = batch["attention_mask"]
    lengths = mask.long().sum(dim=1)
    mrope = family.name in _MROPE_FAMILIES
    if not mrope:  # left padding: positions count real tokens only, as generate() does
        batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(**batch, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1, :].float().log_softmax(-1)  # [B, V]: the answer's first token
    cache = out.past_key_values
    if mrope:
        deltas = getattr(out, "rope_deltas", None)
        if deltas is None:
            raise RuntimeError(f"{family.name}: the prompt forward returned no rope_deltas; use strategy='full'.")
        next_pos = lengths + deltas.view(-1).to(lengths.device)
    else:
        next_pos = lengths
    del out

    n_classes = len(ids)
    first_ids = torch.tensor([a[0] for a in ids], device=first.device)
    scores = first[:, first_ids].double()  # [B, C]
    cont_len = max(len(a) for a in ids) - 1
    if cont_len == 0:
        return scores.cpu()
    cont = torch.full((n_classes, cont_len), pad_id, dtype=torch.long, device=device)
    cont_mask = torch.zeros((n_classes, cont_len), dtype=mask.dtype, device=device)
    targets = torch.zeros((n_classes, cont_len), dtype=torch.long, device=device)
    for c, answer in enumerate(ids):
        k = len(answer) - 1
        cont[c, :k] = torch.tensor(answer[:-1], device=device)
        targets[c, :k] = torch.tensor(answer[1:], device=device)
        cont_mask[c, :k] = 1
    cross = batch.get("cross_attention_mask")  # mllama: which image tiles each token attends to
    steps = torch.arange(cont_len, device=device)

    per_chunk = max(1, _continuation_rows(cache, n_rows, device) // n_classes)
    for start in range(0, n_rows, per_chunk):
        img = torch.arange(start, min(start + per_chunk, n_rows), device=device)
        row_img = img.repeat_interleave(n_classes)  # image of each row, classes consecutive
        kwargs: dict[str, Any] = dict(
            input_ids=cont.repeat(len(img), 1),
            attention_mask=torch.cat([mask[row_img], cont_mask.repeat(len(img), 1)], dim=1),
            position_ids=next_pos[row_img, None] + steps[None, :],
            past_key_values=_select_rows(cache, row_img),
            use_cache=True,
        )
        if cross is not None:
            rows_cross = cross[row_img]
            kwargs["cross_attention_mask"] = torch.cat(
                [rows_cross, rows_cross[:, -1:].expand(-1, cont_len, *rows_cross.shape[2:])], dim=1)
        logits = model(**kwargs).logits.float().log_softmax(-1)  # [R, L, V]
        rows_targets = targets.repeat(len(img), 1).to(logits.device)
        picked = logits.gather(-1, rows_targets.unsqueeze(-1)).squeeze(-1)
        picked = (picked * cont_mask.repeat(len(img), 1).to(logits.device)).double().sum(dim=1)
        scores[img.to(scores.device)] += picked.view(len(img), n_classes).to(scores.device)
        del logits, kwargs
    return scores.cpu()


def _continuation_rows(cache, batch: int, device) -> int:
    """Class continuations scored per forward. Each one holds a copy of its image's prompt cache; on a GPU as
    many as a quarter of the free memory allows (the prompt cache's size per row, measured), so a batch's
    classes take one or two forwards, not one per image; on a CPU, _MAX_CONTINUATION_ROWS."""
    if getattr(device, "type", str(device)) != "cuda":
        return _MAX_CONTINUATION_ROWS
    per_row = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
                  for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                  if isinstance(t, torch.Tensor)) / max(1, batch)
    free = free_memory_bytes(device)
    if per_row <= 0:
        return _MAX_CONTINUATION_ROWS
    return int(max(_MAX_CONTINUATION_ROWS, min(_MAX_GPU_CONTINUATION_ROWS, free * 0.25 // (per_row * 2))))


def _score_full(model, processor, recipe, family: Family, row: dict, image, labels: Sequence[str]) -> torch.Tensor:
    """Reference path: one full sequence per class (the images are encoded once per class)."""
    device, dtype = model_device_dtype(model)
    texts = [prompting.render(processor, recipe.answered(row, label)) for label in labels]
    batch = prompting.encode(processor, texts, [image] * len(labels), padding_side="right")
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    spans = []
    for i, label in enumerate(labels):
        target = prompting.answer_ids(processor, family, label)
        trailing = prompting.trailing_ids(processor, family, texts[i])
        spans.append((prompting.answer_span(batch["input_ids"][i].tolist(), lengths[i], target, trailing, label),
                      target))
    total = batch["input_ids"].shape[1]
    first = min(start for (start, _), _ in spans)
    keep = total - first + 1  # logits from the position before the earliest answer token onwards
    logits = model(**to_model(batch, device, dtype), logits_to_keep=keep).logits.float().log_softmax(-1)
    offset = total - keep
    scores = []
    for i, ((start, end), target) in enumerate(spans):
        rows = logits[i, start - 1 - offset:end - 1 - offset]
        scores.append(rows.gather(-1, torch.tensor(target, device=rows.device)[:, None]).double().sum())
    return torch.stack(scores).cpu()


# ----------------------------------------------------------------------------- metrics
def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str], *,
                           mode: str = "score") -> dict:
    """accuracy, macro-F1 over the classes that occur (each with its 95% interval: uncertainty.py), per-class
    precision/recall/F1/support for every label, confusion matrix (rows = true, labels order).

    A prediction of None (an unparseable answer) counts as wrong: it lowers the recall of its true class,
    stays out of the confusion matrix, and is counted in `unparseable` and `unparseable_by_class`.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(labels)
    y_true = [str(t) for t in y_true]
    unknown = sorted(set(y_true) - set(labels))
    if unknown:
        raise DataError(f"Test targets {unknown[:5]} are not among the recipe's classes {labels}.")
    y_pred = [UNPARSEABLE if p is None else str(p) for p in y_pred]
    n = len(y_true)
    metrics: dict[str, Any] = {"mode": mode, "n": n, "labels": labels}
    if n == 0:
        metrics.update(accuracy=0.0, macro_f1=0.0, per_class={}, confusion_matrix=[[0] * len(labels) for _ in labels])
        return metrics
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    metrics["accuracy"] = float(accuracy_score(y_true, y_pred))
    # Over the classes that occur (a target or a prediction), as the bootstrap interval and the paired change
    # (uncertainty.macro_f1) take it: a recipe class absent from this split, and never predicted, has no F1 to
    # average; scoring it 0 would put the estimate outside its own interval.
    occurring = [label for label in labels if label in set(y_true) | set(y_pred)]
    metrics["macro_f1"] = float(f1_score(y_true, y_pred, labels=occurring, average="macro", zero_division=0))
    metrics["per_class"] = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    metrics["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    metrics.update(intervals(y_true, y_pred, labels))  # 95%: Wilson for accuracy, bootstrap for macro-F1
    if mode == "generate":
        bad = Counter(t for t, p in zip(y_true, y_pred) if p == UNPARSEABLE)
        metrics["unparseable"] = int(sum(bad.values()))
        metrics["unparseable_by_class"] = {label: int(bad.get(label, 0)) for label in labels}
    return metrics


def agreement(pred_a: Sequence, pred_b: Sequence) -> float:
    """Fraction of examples on which two prediction lists agree.

    Accepts evaluate() results, their "predictions" lists (dicts with id/prediction, matched by id), or
    plain lists of labels (matched by position).
    """
    a = pred_a.get("predictions", pred_a) if isinstance(pred_a, dict) else pred_a
    b = pred_b.get("predictions", pred_b) if isinstance(pred_b, dict) else pred_b
    a, b = list(a), list(b)
    if a and isinstance(a[0], dict) and b and isinstance(b[0], dict):
        by_id = {str(p.get("id", i)): p.get("prediction") for i, p in enumerate(b)}
        pairs = [(p.get("prediction"), by_id[str(p.get("id", i))])
                 for i, p in enumerate(a) if str(p.get("id", i)) in by_id]
        if len(pairs) != len(a) or len(by_id) != len(b):
            raise ValueError("the two prediction lists cover different examples "
                             f"({len(a)} vs {len(b)}, {len(pairs)} shared)")
    else:
        if len(a) != len(b):
            raise ValueError(f"the two prediction lists differ in length ({len(a)} vs {len(b)})")
        pairs = list(zip(a, b))
    if not pairs:
        return 0.0
    return sum(1 for x, y in pairs if x is not None and x == y) / len(pairs)


# ----------------------------------------------------------------------------- whole-split evaluation
@torch.inference_mode()  # as evaluate() runs it; here too for callers that call it directly
def evaluate_classification(model, processor, recipe, dataset, *, mode: str = "score", batch_size: int = 8,
                            max_new_tokens: int | None = None, image_size: int | None = None, progress: bool = True,
                            strategy: str = "auto", inputs: EncodedBatches | None = None) -> dict:
    labels = dataset_labels(recipe, dataset)  # the whole split's classes, also when this rank scores a part of it
    dataset, rows = my_shard(dataset, batch_size)  # under DDP: this rank's batches; all gathered below
    stats: dict = {}  # the input pipeline: seconds preparing batches, seconds waiting for them
    if mode == "score":
        predictions = list(_iter_scored(model, processor, recipe, dataset, labels, batch_size=batch_size,
                                        image_size=image_size, progress=progress, strategy=strategy, stats=stats,
                                        inputs=inputs))
    elif mode == "generate":
        max_new_tokens = max_new_tokens or recipe.max_new_tokens
        predictions = []
        for row, answer, cut in generate_all(model, processor, recipe, dataset, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, image_size=image_size, progress=progress,
                                             desc="evaluate (generate)", stats=stats, inputs=inputs):
            label = match_label(answer, labels)
            predictions.append({"id": str(row.get("id", len(predictions))), "target": recipe.target(row),
                                "prediction": label, "answer": answer, "parsed": label is not None, "cut_off": cut})
    else:
        raise ValueError(f"unknown evaluation mode {mode!r}: use 'score' or 'generate'")
    predictions = gather_in_order(predictions, rows)
    metrics = classification_metrics([p["target"] for p in predictions], [p["prediction"] for p in predictions],
                                     labels, mode=mode)
    if mode == "generate":
        metrics["max_new_tokens"] = max_new_tokens
        metrics["cut_off"] = cut_off_count(predictions)
    return {"metrics": metrics, "predictions": predictions, "input_pipeline": stats}


def _iter_scored(model, processor, recipe, dataset, labels, *, batch_size, image_size, progress, strategy,
                 stats: dict | None = None, inputs: EncodedBatches | None = None):
    family = family_of(model.config)
    ids = label_token_ids(processor, family, labels)
    if strategy == "auto":
        strategy = "packed" if can_pack(model, family) else "cache"
    if strategy in ("cache", "packed") and len(dataset):  # the boundary is the same for every row: checked on one
        first = dataset[0]
        check_label_tokenization(processor, family, recipe, prompt_text(processor, recipe, first), labels, ids, first)
    encoded_ahead = strategy in ("cache", "packed")
    encode = encoder(processor, recipe, image_size, inputs)
    feed = Prefetch(batches(dataset, batch_size), (lambda rows: pinned(encode(rows))) if encoded_ahead else
                    (lambda rows: None), ahead=prefetch_depth(model) if encoded_ahead else 0)
    scoring: dict = {"strategy": strategy}
    # Seconds from one batch's scores to the next's, the first one's check included, less the time spent waiting
    # for prepared batches (the feed's waited_s, counted there): where a pass's time goes, as before the look-ahead.
    # Scores are read one batch late: the GPU is already working on the next batch while the CPU reads a batch's
    # scores, builds its predictions and copies in the batch after (between batches it would otherwise idle).
    batch_seconds: list[float] = []
    last, last_waited = time.perf_counter(), 0.0
    in_flight: deque = deque()  # (rows, HostCopy of their scores), at most two
    done = 0  # rows scored: a row without an id is named by its position, as generation names it

    def read_oldest():
        nonlocal last, last_waited, done
        rows, copy = in_flight.popleft()
        scores = copy.result()
        best, probs = scores.argmax(dim=-1).tolist(), scores.softmax(dim=-1).tolist()
        for i, (row, values) in enumerate(zip(rows, scores.tolist())):
            yield {"id": str(row.get("id", done + i)), "target": recipe.target(row), "prediction": labels[best[i]],
                   "probabilities": {label: round(p, 6) for label, p in zip(labels, probs[i])},
                   "log_likelihoods": {label: round(v, 4) for label, v in zip(labels, values)}}
        now, waited = time.perf_counter(), feed.stats["waited_s"]
        batch_seconds.append(round(max(0.0, now - last - (waited - last_waited)), 3))
        last, last_waited = now, waited
        done += len(rows)
        bar.update(len(rows))

    with eval_mode(model), progress_bar(len(dataset), "evaluate (label scores)", progress) as bar:
        for rows, encoded in feed:
            if strategy == "packed" and "checked_rows" not in scoring:
                strategy = _check_packed(model, processor, recipe, family, rows, encoded, labels, ids, scoring,
                                         image_size)
            if strategy == "packed":
                scores = score_packed(model, processor, family, encoded, ids, wait=False)
            elif strategy == "cache":
                scores = score_encoded(model, processor, family, encoded, ids)
            else:
                scores = score_rows(model, processor, recipe, rows, labels, image_size=image_size, strategy=strategy,
                                    family=family, ids=ids)
            in_flight.append((rows, HostCopy(scores)))
            if len(in_flight) > 1:
                yield from read_oldest()
        while in_flight:
            yield from read_oldest()
    if stats is not None:
        stats.update(feed.summary(), label_scoring=scoring, batch_seconds=batch_seconds)


_CHECKED_ROWS = 2


def _check_packed(model, processor, recipe, family: Family, rows, encoded: dict, labels, ids, scoring: dict,
                  image_size) -> str:
    """The packed strategy's first batch, checked on its first rows against one full sequence per class and the
    cached strategy (packed.py's check_packed). Returns the strategy to go on with; `scoring` records the check
    (label_scoring in eval_*.json). A check that passed on an earlier pass over this model along the same attention
    path is reused, not repeated (packed.passed_check): the run's pass after training saves six forwards."""
    earlier = passed_check(model, family)
    if earlier is not None:
        scoring.update(checked_rows=0, agreed=True, check_seconds=0.0, reused_check=earlier)
        return "packed"
    start = time.perf_counter()
    checked = list(rows)[:_CHECKED_ROWS]
    reference = torch.stack([_score_full(model, processor, recipe, family, row, image, labels)
                             for row, image in zip(checked, row_images(checked, image_size))])
    cached = score_encoded(model, processor, family, first_rows(encoded, len(checked)), ids)
    scoring.update(check_packed(model, processor, family, encoded, ids, cached, reference))
    scoring["check_seconds"] = round(time.perf_counter() - start, 3)  # check_packed's float() waits for the GPU
    if scoring["agreed"]:
        remember_check(model, family, {k: v for k, v in scoring.items() if k != "strategy"})
        return "packed"
    log.warning("Label scoring: the packed strategy failed its check against full sequences on the first rows "
                "(%s); this model's attention may not take a 4-D mask. Scoring with the cached strategy.",
                {k: v for k, v in scoring.items() if k != "strategy"})
    scoring["strategy"] = "cache"
    return "cache"
