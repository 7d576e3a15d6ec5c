"""Visual question answering: per answer type (closed, open) and overall.

Answers are normalised before any comparison (lower case, punctuation and the articles a/an/the
removed, spaces collapsed: "Yes." == "yes"). Per answer type:
- accuracy: normalised exact match of the greedy answer (for closed questions, the closed accuracy;
  for open ones, the open exact match);
- closed questions also get label scoring: each answer of the closed answer set (every normalised
  closed reference in the test split, e.g. yes/no) ranked by its likelihood, as classification does;
- recall: the share of the reference's tokens found in the prediction; token F1 (SQuAD-style);
  BLEU-1 (sacrebleu, unigram, 0-1).
Every row stays in its denominator: a wrong or empty answer counts as wrong (a widely copied VQA
script drops wrong closed answers, inflating accuracy).

`vqa_metrics(rows)` takes {answer_type, target, prediction[, scored]} rows; `evaluate_vqa` runs the model.
The two ceilings of the offline demo live here too: how well a model could do seeing only the image
(question-blind) or only the question (image-blind), measured on the same test rows.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import torch

from ..data.samples import image_refs
from ..distributed import gather_in_order, my_shard
from .caption import cut_off_count, generate_all
from .inputs import EncodedBatches, batches, eval_mode, progress_bar
from .text import strip_punctuation, tokens

ARTICLES = re.compile(r"\b(a|an|the)\b")
ANSWER_TYPES = ("closed", "open")


def normalize(text: str) -> str:
    """Lower case, no punctuation (any script's: text.py), no articles, single spaces."""
    text = ARTICLES.sub(" ", strip_punctuation(str(text or "").lower()))
    return " ".join(text.split())


def token_scores(prediction: str, reference: str) -> tuple[float, float]:
    """(recall, F1) of the normalised tokens (a Chinese character or kana is a token: text.py); multiset overlap,
    as in SQuAD."""
    pred, ref = tokens(normalize(prediction)), tokens(normalize(reference))
    if not ref:
        return float(not pred), float(not pred)
    common = sum((Counter(pred) & Counter(ref)).values())
    recall = common / len(ref)
    precision = common / len(pred) if pred else 0.0
    f1 = 2 * precision * recall / (precision + recall) if common else 0.0
    return recall, f1


def bleu1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU with unigrams only (brevity penalty included), 0-1, on normalised tokens (token_scores')."""
    from sacrebleu.metrics import BLEU

    if not predictions:
        return float("nan")
    metric = BLEU(max_ngram_order=1, tokenize="none", effective_order=True)
    words = lambda text: " ".join(tokens(normalize(text)))  # noqa: E731 - sacrebleu splits on spaces
    score = metric.corpus_score([words(p) for p in predictions], [[words(r) for r in references]])
    return score.score / 100.0


def _group_metrics(rows: Sequence[dict]) -> dict:
    recalls, f1s = zip(*(token_scores(r["prediction"], r["target"]) for r in rows)) if rows else ((), ())
    out = {
        "n": len(rows),
        "accuracy": sum(_right(r, "prediction") for r in rows) / len(rows),
        "recall": sum(recalls) / len(rows),
        "token_f1": sum(f1s) / len(rows),
        "bleu1": bleu1([r["prediction"] for r in rows], [r["target"] for r in rows]),
    }
    # Label scores exist for closed questions only: their accuracy is the closed group's, over all its rows (one
    # never scored counts wrong); over a mix of closed and open questions it would count every open one wrong.
    if any(r.get("scored") is not None for r in rows) and all(r["answer_type"] == "closed" for r in rows):
        out["accuracy_scored"] = sum(_right(r, "scored") for r in rows) / len(rows)
    return out


def vqa_metrics(rows: Sequence[dict]) -> dict:
    """Metrics per answer type and overall, plus flat headline keys (closed_accuracy, open_exact_match, ...)."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_type[row["answer_type"]].append(row)
    per_type = {kind: _group_metrics(by_type[kind]) for kind in sorted(by_type)}
    overall = _group_metrics(list(rows)) if rows else {"n": 0}
    flat = {"n": len(rows), "overall_accuracy": overall.get("accuracy"), "overall_token_f1": overall.get("token_f1"),
            "overall_bleu1": overall.get("bleu1")}
    if "closed" in per_type:
        flat.update(closed_accuracy=per_type["closed"]["accuracy"],
                    closed_accuracy_scored=per_type["closed"].get("accuracy_scored"))
    if "open" in per_type:
        flat.update(open_exact_match=per_type["open"]["accuracy"], open_recall=per_type["open"]["recall"],
                    open_token_f1=per_type["open"]["token_f1"], open_bleu1=per_type["open"]["bleu1"])
    flat.update(_intervals(rows))
    return {**flat, "per_type": per_type, "overall": overall}


def _right(row: dict, key: str) -> float:
    """1.0 when the row's `key` answer ("prediction" or "scored") matches its target once normalised: the one
    definition of a right answer, for the accuracies and their intervals. A question never scored is wrong."""
    answer = row.get(key)
    if answer is None and key == "scored":
        return 0.0
    return float(normalize(answer) == normalize(row["target"]))


def _image_groups(rows: Sequence[dict]) -> list[str]:
    """Each row's image, the unit that intervals resample; a row without an image id is an image of its own."""
    return [row.get("image_id") or f"row {k}" for k, row in enumerate(rows)]


# (metric, answer type or None for every row, which answer): the accuracies that carry intervals
_ACCURACIES = (("overall_accuracy", None, "prediction"), ("closed_accuracy", "closed", "prediction"),
               ("closed_accuracy_scored", "closed", "scored"), ("open_exact_match", "open", "prediction"))


def _subsets(rows: Sequence[dict]):
    """(metric, indices of its rows, which answer) for each accuracy the rows have."""
    for name, kind, key in _ACCURACIES:
        chosen = [k for k, row in enumerate(rows) if kind is None or row["answer_type"] == kind]
        if chosen and (key == "prediction" or any(rows[k].get(key) is not None for k in chosen)):
            yield name, chosen, key


def _intervals(rows: Sequence[dict]) -> dict:
    """95% intervals of the accuracies, resampling whole images (uncertainty.clustered_interval): the questions
    about one image are not independent."""
    from .uncertainty import clustered_interval

    groups = _image_groups(rows)
    return {f"{name}_ci95": clustered_interval([_right(rows[k], key) for k in chosen], [groups[k] for k in chosen])
            for name, chosen, key in _subsets(rows)}


def paired_vqa_change(before: Sequence[dict], after: Sequence[dict]) -> dict | None:
    """After against before on the same questions (prediction rows matched by id): per accuracy, the difference
    and its paired bootstrap interval over images (uncertainty.clustered_change); and how many questions only
    one pass answered right. None when the two passes share no question."""
    from .uncertainty import clustered_change, matched_by_id

    pairs = matched_by_id(before, after)
    if not pairs:
        return None
    rows = [row for _, row in pairs]
    groups = _image_groups(rows)
    was = [_right(b, "prediction") for b, _ in pairs]
    now = [_right(a, "prediction") for _, a in pairs]
    out: dict = {"n": len(pairs), "images": len(set(groups)),
                 "right_only_before": sum(b > a for b, a in zip(was, now)),
                 "right_only_after": sum(a > b for b, a in zip(was, now))}
    for name, chosen, key in _subsets(rows):
        if key == "scored" and any(pairs[k][0].get(key) is None for k in chosen):
            continue  # the pass before did not score these questions: no difference to take
        out[name] = clustered_change([_right(pairs[k][0], key) for k in chosen],
                                     [_right(pairs[k][1], key) for k in chosen], [groups[k] for k in chosen])
    return out


def closed_answer_set(dataset) -> list[str]:
    """The normalised answers of the split's closed questions (e.g. ['no', 'yes']), each as it is most often written:
    label scoring ranks these exact texts, and the first spelling met ("Yes" where the data mostly writes "yes") is
    one the model was rarely trained to write, so its likelihood is lower for reasons that are not the image."""
    spellings: dict[str, Counter] = defaultdict(Counter)
    for kind, target in zip(dataset["answer_type"][:], dataset["target"][:]):  # [:]: one read of each column
        if kind == "closed":
            spellings[normalize(target)][str(target).strip()] += 1
    return [spellings[k].most_common(1)[0][0] for k in sorted(spellings)]  # a tie: the first met


@torch.inference_mode()  # as evaluate() runs it; here too for callers that call it directly
def evaluate_vqa(model, processor, recipe, dataset, *, batch_size: int = 8, max_new_tokens: int | None = None,
                 image_size: int | None = None, progress: bool = True, inputs: EncodedBatches | None = None) -> dict:
    """Greedy answers for every row, label scores over the closed answer set for closed rows; vqa_metrics."""
    from .classify import score_rows

    max_new_tokens = max_new_tokens or recipe.max_new_tokens
    # The whole split's closed answers (one rank's part may hold only "yes"), then this rank's batches (under DDP;
    # all of them in one process), gathered below.
    closed_set = closed_answer_set(dataset) if "answer_type" in dataset.column_names else []
    dataset, rows_of_ranks = my_shard(dataset, batch_size)
    predictions = []
    for row, answer, cut in generate_all(model, processor, recipe, dataset, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, image_size=image_size, progress=progress,
                                         desc="evaluate (answers)", inputs=inputs):
        predictions.append({"id": str(row["id"]), "image_id": _image_id(row), "question": row.get("question", ""),
                            "answer_type": row.get("answer_type") or "open", "target": recipe.target(row),
                            "prediction": answer, "cut_off": cut})
    if len(closed_set) > 1:
        closed = [i for i, p in enumerate(predictions) if p["answer_type"] == "closed"]
        subset = dataset.select(closed)
        with eval_mode(model), progress_bar(len(subset), "evaluate (closed, label scores)", progress) as bar:
            done = 0
            for rows in batches(subset, batch_size):
                scores = score_rows(model, processor, recipe, rows, closed_set, image_size=image_size)
                for k in range(len(rows)):
                    predictions[closed[done + k]]["scored"] = closed_set[int(scores[k].argmax())]
                done += len(rows)
                bar.update(len(rows))
    predictions = gather_in_order(predictions, rows_of_ranks)
    metrics = vqa_metrics(predictions)
    metrics.update(mode="generate + closed label scores", max_new_tokens=max_new_tokens, closed_answers=closed_set,
                   cut_off=cut_off_count(predictions))
    metrics.update({f"{side}_ceiling": value for side, value in blind_ceilings(predictions).items()})
    return {"metrics": metrics, "predictions": predictions}


def _image_id(row: dict) -> str:
    if row.get("image_id"):
        return str(row["image_id"])
    first = image_refs(row)[0]
    return str(first) if isinstance(first, str) else str((first or {}).get("path") or row["id"])


# ----------------------------------------------------------------------------- ceilings
def blind_ceilings(rows: Iterable[dict]) -> dict:
    """The best accuracy a model could reach on these rows seeing only the image (one answer per image:
    its most frequent reference) or only the question (one answer per question text)."""
    rows = list(rows)

    def best(key: str) -> float:
        groups: dict[str, Counter] = defaultdict(Counter)
        for row in rows:
            groups[row[key]][normalize(row["target"])] += 1
        return sum(c.most_common(1)[0][1] for c in groups.values()) / len(rows) if rows else float("nan")

    return {"question_blind": best("image_id"), "image_blind": best("question")}
