"""Honest numbers on the whole test split, outside any trainer.

`evaluate(model, processor, recipe, dataset)` works on a plain transformers model or a peft-wrapped
one. It runs under `torch.inference_mode()`, one batch at a time, keeping only per-example answers
(never the logits of the whole split), with a progress bar.

- classification, mode "score": every class ranked by its log-likelihood as the answer
  (classify.py); mode "generate": greedy decoding matched to a class, unparseable answers counted.
- captioning: greedy generation scored with BLEU and ROUGE-L (caption.py).
- vqa: per answer type, closed accuracy (generation and label scoring), open exact match, recall, token
  F1, BLEU-1 (vqa.py).

Returns {"metrics": {...}, "predictions": [{"id", "target", "prediction", ...}, ...]}.
"""
from __future__ import annotations

import time

from ..models.folding import folded_adapters
from ..models.stance import can_run_eager, eager_stance
from .caption import caption_metrics, evaluate_captioning
from .classify import agreement, classification_metrics, evaluate_classification, match_label
from .inputs import EncodedBatches
from .vqa import evaluate_vqa, vqa_metrics

MODES = ("score", "generate")


def shape_order(dataset) -> list[int] | None:
    """Row order that groups prepared images by shape (then length), or None when already grouped or unknown."""
    columns = getattr(dataset, "column_names", None) or []
    if "image_shape" not in columns or not hasattr(dataset, "select"):
        return None
    shapes = [str(s) for s in dataset["image_shape"][:]]  # [:]: one read of the column, not one row at a time
    lengths = dataset["length"][:] if "length" in columns else [0] * len(shapes)
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i], lengths[i]))
    return None if order == list(range(len(shapes))) else order


def evaluate(model, processor, recipe, dataset, *, mode: str = "score", batch_size: int = 8,
             max_new_tokens: int | None = None, image_size: int | None = None, progress: bool = True,
             eager: bool = False, fold_adapters: bool = True, dequantize: bool | None = None,
             inputs: EncodedBatches | None = None) -> dict:
    """Evaluate a model on rows {image, target, id}; see the module docstring for what comes back.

    eager=True runs every torch.compile'd function (Unsloth's compiled modules) as plain Python: no tracing, which
    a process pays once per model state before its first compiled pass. fold_adapters: score a LoRA-tuned model
    with each adapter folded into its layer's 16-bit weight (models/folding.py: one matmul a layer, the merged
    export's weights) where memory allows; `folded_adapters` in the result says what was done. dequantize: every
    other 4-bit layer (all of them with fold_adapters=False) runs on its weight dequantized once for the pass, under
    the same memory rule: the arithmetic of a 4-bit matmul of more than one row, which dequantizes on every call.
    None (the default): when the pass generates (one forward per new token; 1.42x tokens/s on the untrained 11B
    shape), not for label scoring (one forward per batch: no gain measured; benchmarks/README.md).
    inputs: an EncodedBatches shared by passes over the same split (a run's passes before and after training):
    a later pass reads the batches an earlier one encoded; `encoded_batches` in the result counts them."""
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}: use one of {', '.join(MODES)}")
    image_size = image_size or recipe.image_size
    started = time.perf_counter()
    eager = bool(eager and can_run_eager())  # torch >= 2.6; an older torch traces as before
    counted = dict(inputs.stats) if inputs is not None else None
    if dequantize is None:
        dequantize = not (recipe.is_classification and mode == "score")
    with eager_stance(eager), folded_adapters(model, fold_adapters, dequantize=dequantize) as folded:
        result = _evaluate_grouped(model, processor, recipe, dataset, mode=mode, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, image_size=image_size, progress=progress,
                                   inputs=inputs)
    seconds = time.perf_counter() - started
    if inputs is not None:
        result["encoded_batches"] = {**{k: inputs.stats[k] - counted[k] for k in counted},
                                     "kept_mib": round(inputs.kept_bytes / 2**20, 1)}
    result["timing"] = {"seconds": round(seconds, 2), "batch_size": batch_size,
                        "examples_per_second": round(len(dataset) / seconds, 2) if seconds > 0 else None,
                        "compiled": not eager}
    result["folded_adapters"] = folded
    return result


def _evaluate_grouped(model, processor, recipe, dataset, **kw) -> dict:
    order = shape_order(dataset)
    if order is not None:  # batches of one image shape: no padding, the vision tower runs them as a batch
        result = _evaluate_once(model, processor, recipe, dataset.select(order), **kw)
        predictions = [None] * len(order)
        for position, prediction in zip(order, result["predictions"]):
            predictions[position] = prediction
        return {**result, "predictions": predictions}  # the dataset's own order; metrics do not depend on it
    return _evaluate_once(model, processor, recipe, dataset, **kw)


def _evaluate_once(model, processor, recipe, dataset, *, mode, batch_size, max_new_tokens, image_size,
                   progress, inputs) -> dict:
    # Each evaluate_* runs itself in torch.inference_mode(), however it is called.
    if recipe.is_vqa:
        return evaluate_vqa(model, processor, recipe, dataset, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, image_size=image_size, progress=progress, inputs=inputs)
    if recipe.is_classification:
        return evaluate_classification(model, processor, recipe, dataset, mode=mode, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, image_size=image_size, progress=progress,
                                       inputs=inputs)
    return evaluate_captioning(model, processor, recipe, dataset, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, image_size=image_size, progress=progress, inputs=inputs)


__all__ = ["MODES", "EncodedBatches", "agreement", "caption_metrics", "classification_metrics", "evaluate",
           "match_label", "vqa_metrics"]
