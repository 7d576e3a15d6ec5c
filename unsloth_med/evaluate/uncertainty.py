"""How sure a classification score is: 95% intervals, and the paired test of before against after.

With 140 test images one image is 0.7 points of accuracy, and an accuracy of 0.8 has a 95% interval about
0.14 wide: two runs, or a model before and after training, differ by chance by that much. These are the
standard answers, from scipy:

- accuracy: the Wilson score interval (`binomtest(...).proportion_ci`), sound at small n and near 0 or 1;
- macro-F1, which has no closed form: a percentile bootstrap over the test examples, seeded, so a report
  gives the same interval every time it is written;
- before against after, on the same examples: McNemar's exact test (a binomial test on the examples only one of
  the two got right), and paired bootstrap intervals of the two differences (each resample draws the same
  examples for both);
- VQA, where one image carries several questions: a bootstrap that resamples whole images (`clustered_interval`),
  since questions about one image are not independent and resampling them one by one would narrow the interval.

Nothing here knows about models: it takes labels and predictions, as metrics.json and eval_*.json hold them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0  # fixed: the same predictions always give the same intervals
_CELLS_PER_BATCH = 20_000_000  # resamples x classes x examples held at once by the vectorised macro-F1


def accuracy_interval(correct: int, n: int, level: float = LEVEL) -> list[float] | None:
    """The Wilson score interval of `correct` out of `n`, or None for an empty split."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def codes(y_true: Sequence, y_pred: Sequence, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels as class numbers 0..K-1; a prediction that is no label (None, unparseable) becomes K, a class of
    its own that is never a target: it costs its true class recall and no class precision, as in scikit-learn."""
    index = {str(label): k for k, label in enumerate(labels)}
    other = len(labels)
    return (np.array([index.get(str(t), other) for t in y_true], dtype=np.int64),
            np.array([other if p is None else index.get(str(p), other) for p in y_pred], dtype=np.int64))


def macro_f1(true: np.ndarray, pred: np.ndarray, n_labels: int, axis: int = -1) -> np.ndarray:
    """Macro-F1 along `axis`, for many resamples at once: per class 2TP / (2TP + FP + FN), averaged over the
    classes that occur (as a target or a prediction). That is scikit-learn's `f1_score(average="macro",
    labels=present)`; on a whole split, where every label is some example's target, it is the reported
    macro-F1. A resample that happens to miss a rare class is not scored 0 for it, which would drag the
    bootstrap interval below the estimate."""
    true, pred = np.moveaxis(true, axis, -1), np.moveaxis(pred, axis, -1)
    classes = np.arange(n_labels)[:, None]
    is_true, is_pred = true[..., None, :] == classes, pred[..., None, :] == classes
    tp = (is_true & is_pred).sum(-1)
    denominator = 2 * tp + (is_true ^ is_pred).sum(-1)  # 2TP + FP + FN
    present = denominator > 0
    f1 = np.where(present, 2 * tp / np.maximum(denominator, 1), 0.0)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def _bootstrap(data: tuple[np.ndarray, ...], statistic, n_labels: int, level: float, resamples: int,
               seed: int) -> list[float] | None:
    """A paired percentile bootstrap of `statistic(*data, axis)` over the examples; None below two examples."""
    n = len(data[0])
    if n < 2:
        return None
    from scipy.stats import bootstrap

    result = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                       confidence_level=level, method="percentile", rng=np.random.default_rng(seed),
                       batch=max(1, _CELLS_PER_BATCH // ((n_labels + 1) * n)))
    low, high = result.confidence_interval
    return [float(low), float(high)]


def macro_f1_interval(y_true: Sequence, y_pred: Sequence, labels: Sequence[str], level: float = LEVEL,
                      resamples: int = RESAMPLES, seed: int = SEED) -> list[float] | None:
    """A percentile bootstrap interval of macro-F1 over the test examples."""
    k = len(labels)
    return _bootstrap(codes(y_true, y_pred, labels), lambda t, p, axis: macro_f1(t, p, k, axis), k, level,
                      resamples, seed)


def clustered_interval(values: Sequence[float], groups: Sequence, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = SEED) -> list[float] | None:
    """A percentile bootstrap interval of the mean of `values` when rows come in groups that are not independent
    (VQA asks several questions about one image): whole groups are resampled and the mean is taken over their rows.
    None below two groups."""
    counts, sums = _per_group(groups, values)
    return _bootstrap((sums, counts), lambda s, c, axis: s.sum(axis) / c.sum(axis), 0, level, resamples, seed)


def clustered_change(before: Sequence[float], after: Sequence[float], groups: Sequence, level: float = LEVEL,
                     resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """After against before on the same rows, when rows come in groups (`clustered_interval`): the difference of
    the means and its paired percentile bootstrap interval, each resample drawing the same groups for both."""
    counts, was, now = _per_group(groups, before, after)
    return {"difference": float(now.sum() / counts.sum() - was.sum() / counts.sum()),
            "ci95": _bootstrap((was, now, counts), lambda b, a, c, axis: (a.sum(axis) - b.sum(axis)) / c.sum(axis),
                               0, level, resamples, seed)}


def _per_group(groups: Sequence, *values: Sequence[float]) -> tuple[np.ndarray, ...]:
    """(rows per group, then each of `values` summed per group), groups in order of first appearance."""
    index: dict[str, int] = {}
    rows = np.array([index.setdefault(str(g), len(index)) for g in groups], dtype=np.int64)
    sums = [np.bincount(rows, weights=np.asarray(v, dtype=np.float64), minlength=len(index)) for v in values]
    return (np.bincount(rows, minlength=len(index)).astype(np.float64), *sums)


def intervals(y_true: Sequence, y_pred: Sequence, labels: Sequence[str]) -> dict:
    """{"accuracy_ci95", "macro_f1_ci95"} for one evaluation, for its metrics."""
    true, pred = codes(y_true, y_pred, labels)
    return {"accuracy_ci95": accuracy_interval(int((true == pred).sum()), len(true)),
            "macro_f1_ci95": macro_f1_interval(y_true, y_pred, labels)}


class RepeatedIds(ValueError):
    """Two predictions of one pass carry the same id: the passes cannot be paired."""


def matched_by_id(before: Sequence[dict], after: Sequence[dict]) -> list[tuple[dict, dict]]:
    """(before, after) prediction pairs of the same example, matched by id, in the after pass's order. Ids must be
    unique within each pass: pairing on a repeated id would silently compare different examples."""
    for side, rows in (("before", before), ("after", after)):
        seen: set[str] = set()
        repeated = sorted({i for i in (str(p.get("id")) for p in rows) if i in seen or seen.add(i)})
        if repeated:
            raise RepeatedIds(f"the predictions {side} training repeat the ids {repeated[:5]}: a paired comparison "
                             "matches the two passes by id, so every example needs its own (give each row an "
                             "`id`, or let the loaders name them)")
    earlier = {str(p.get("id")): p for p in before}
    return [(earlier[str(p.get("id"))], p) for p in after if str(p.get("id")) in earlier]


def paired_change(before: Sequence[dict], after: Sequence[dict], labels: Sequence[str], level: float = LEVEL,
                  resamples: int = RESAMPLES, seed: int = SEED) -> dict | None:
    """After against before on the same examples (predictions {"id", "target", "prediction"}, matched by id):
    the differences in accuracy and macro-F1 with paired bootstrap intervals, and McNemar's exact test.
    None when the two passes share no example."""
    from scipy.stats import binomtest

    pairs = matched_by_id(before, after)
    if not pairs:
        return None
    true, was = codes([b["target"] for b, _ in pairs], [b["prediction"] for b, _ in pairs], labels)
    _, now = codes([a["target"] for _, a in pairs], [a["prediction"] for _, a in pairs], labels)
    k = len(labels)
    right_before, right_after = was == true, now == true
    only_before, only_after = int((right_before & ~right_after).sum()), int((~right_before & right_after).sum())
    discordant = only_before + only_after
    return {
        "n": len(pairs),
        "accuracy": {"difference": float(right_after.mean() - right_before.mean()),
                     "ci95": _bootstrap((true, was, now),
                                        lambda t, b, a, axis: (a == t).mean(axis) - (b == t).mean(axis),
                                        k, level, resamples, seed)},
        "macro_f1": {"difference": float(macro_f1(true, now, k) - macro_f1(true, was, k)),
                     "ci95": _bootstrap((true, was, now),
                                        lambda t, b, a, axis: macro_f1(t, a, k, axis) - macro_f1(t, b, k, axis),
                                        k, level, resamples, seed)},
        "right_only_before": only_before,
        "right_only_after": only_after,
        "mcnemar_exact_p": float(binomtest(only_after, discordant).pvalue) if discordant else 1.0,
    }
