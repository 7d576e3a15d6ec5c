"""How sure a classification score is: the intervals and the paired test the report prints (evaluate/uncertainty.py),
checked against scikit-learn, the closed-form Wilson interval and the binomial distribution written out."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from unsloth_med.evaluate import classification_metrics
from unsloth_med.evaluate.uncertainty import (
    accuracy_interval,
    clustered_change,
    clustered_interval,
    codes,
    intervals,
    macro_f1,
    macro_f1_interval,
    paired_change,
)

LABELS = ["Avulsion", "Comminuted", "Greenstick", "Hairline", "Spiral"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.one_of(st.none(), st.integers(0, 4))), min_size=1, max_size=60))
def test_vectorised_macro_f1_is_scikit_learns_over_the_classes_that_occur(pairs):
    y_true = [LABELS[t] for t, _ in pairs]
    y_pred = [None if p is None else LABELS[p] for _, p in pairs]  # None: an answer that names no class
    present = [label for label in LABELS if label in set(y_true) | set(y_pred)]
    expected = f1_score(y_true, ["(unparseable)" if p is None else p for p in y_pred], labels=present,
                        average="macro", zero_division=0)
    true, pred = codes(y_true, y_pred, LABELS)
    assert macro_f1(true, pred, len(LABELS)) == pytest.approx(expected, abs=1e-12)
    # many resamples at once, along either axis: row by row the same as one at a time
    stacked_true, stacked_pred = np.stack([true, true[::-1]]), np.stack([pred, pred[::-1]])
    assert macro_f1(stacked_true, stacked_pred, len(LABELS)).tolist() == pytest.approx(
        [macro_f1(true, pred, len(LABELS)), macro_f1(true[::-1], pred[::-1], len(LABELS))], abs=1e-12)
    assert macro_f1(stacked_true.T, stacked_pred.T, len(LABELS), axis=0).tolist() == pytest.approx(
        macro_f1(stacked_true, stacked_pred, len(LABELS)).tolist(), abs=1e-12)


def test_on_a_whole_split_the_macro_f1_is_the_reported_one():
    rng = random.Random(3)
    y_true = [LABELS[i % 5] for i in range(140)]  # every label is some example's target, as on a test split
    y_pred = [t if rng.random() < 0.7 else rng.choice(LABELS + [None]) for t in y_true]
    metrics = classification_metrics(y_true, y_pred, LABELS, mode="generate")
    assert macro_f1(*codes(y_true, y_pred, LABELS), len(LABELS)) == pytest.approx(metrics["macro_f1"], abs=1e-12)
    low, high = metrics["macro_f1_ci95"]
    assert low < metrics["macro_f1"] < high and high - low < 0.35
    low, high = metrics["accuracy_ci95"]
    assert low < metrics["accuracy"] < high


@pytest.mark.parametrize("correct, n", [(0, 20), (3, 20), (97, 120), (120, 120), (1, 1)])
def test_accuracy_interval_is_the_wilson_score_interval(correct, n):
    z = 1.959963984540054  # the standard normal's 97.5% point
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = accuracy_interval(correct, n)
    assert low == pytest.approx(max(0.0, centre - half), abs=1e-9) and high == pytest.approx(min(1.0, centre + half),
                                                                                             abs=1e-9)
    assert low <= p <= high
    assert accuracy_interval(0, 0) is None


def test_intervals_narrow_with_more_examples_and_are_the_same_every_time():
    small_true = [LABELS[i % 5] for i in range(20)]
    small_pred = [t if i % 4 else LABELS[(i + 1) % 5] for i, t in enumerate(small_true)]  # 75% right
    large_true, large_pred = small_true * 10, small_pred * 10  # the same rates, ten times the examples
    small, large = intervals(small_true, small_pred, LABELS), intervals(large_true, large_pred, LABELS)
    for key in ("accuracy_ci95", "macro_f1_ci95"):
        assert large[key][1] - large[key][0] < (small[key][1] - small[key][0]) / 2
    assert intervals(small_true, small_pred, LABELS) == small  # seeded: a report always says the same
    assert macro_f1_interval(small_true[:1], small_pred[:1], LABELS) is None  # no bootstrap of one example


def _predictions(targets, answers, ids=None):
    ids = ids or [f"img{i}" for i in range(len(targets))]
    return [{"id": i, "target": t, "prediction": a} for i, t, a in zip(ids, targets, answers)]


def test_mcnemar_counts_only_the_examples_one_pass_got_right_and_pairs_them_by_id():
    targets = [LABELS[i % 5] for i in range(40)]
    wrong = [LABELS[(i + 1) % 5] for i in range(40)]
    before_answers = [targets[i] if i < 1 or i >= 10 else wrong[i] for i in range(40)]  # right on 0 and 10..39
    after_answers = [targets[i] if i >= 1 else None for i in range(40)]  # right on 1..39, unparseable on 0
    before = _predictions(targets, before_answers)
    after = list(reversed(_predictions(targets, after_answers)))  # another order: paired by id, not position
    after.append({"id": "only-after", "target": LABELS[0], "prediction": LABELS[0]})  # not in both: left out
    change = paired_change(before, after, LABELS)
    assert change["n"] == 40
    assert change["right_only_before"] == 1 and change["right_only_after"] == 9
    # exact two-sided binomial test of 1 against 9 discordant pairs: 2 x P(X <= 1), X ~ Binomial(10, 1/2)
    assert change["mcnemar_exact_p"] == pytest.approx(2 * (math.comb(10, 0) + math.comb(10, 1)) / 2 ** 10)
    assert change["accuracy"]["difference"] == pytest.approx((39 - 31) / 40)
    low, high = change["accuracy"]["ci95"]
    assert low < change["accuracy"]["difference"] < high
    b = classification_metrics(targets, before_answers, LABELS)["macro_f1"]
    a = classification_metrics(targets, after_answers, LABELS)["macro_f1"]
    assert change["macro_f1"]["difference"] == pytest.approx(a - b, abs=1e-12)


def test_the_same_predictions_twice_change_nothing():
    targets = [LABELS[i % 5] for i in range(30)]
    answers = [t if i % 3 else LABELS[0] for i, t in enumerate(targets)]
    change = paired_change(_predictions(targets, answers), _predictions(targets, answers), LABELS)
    assert change["right_only_before"] == change["right_only_after"] == 0 and change["mcnemar_exact_p"] == 1.0
    assert change["accuracy"] == {"difference": 0.0, "ci95": [0.0, 0.0]}
    assert change["macro_f1"] == {"difference": 0.0, "ci95": [0.0, 0.0]}
    assert paired_change(_predictions(targets[:2], answers[:2]), _predictions(targets[:2], answers[:2], ids=["x", "y"]),
                         LABELS) is None


def test_asking_the_same_question_again_about_an_image_does_not_narrow_its_interval():
    """Questions about one image are resampled together: a copy of every question adds no evidence, and the
    interval stays exactly what it was; resampled one question at a time it would narrow as if it did."""
    rng = random.Random(5)
    right = [float(rng.random() < 0.7) for _ in range(60)]
    images = [f"image{k}" for k in range(60)]
    once = clustered_interval(right, images)
    twice = clustered_interval(right + right, images + images)
    assert twice == pytest.approx(once, abs=1e-12)
    low, high = once
    assert low < sum(right) / 60 < high
    as_if_independent = clustered_interval(right + right, [f"row{k}" for k in range(120)])
    assert as_if_independent[1] - as_if_independent[0] < 0.8 * (high - low)
    assert clustered_interval([1.0, 0.0], ["one image", "one image"]) is None  # one image: nothing to resample


def test_a_change_measured_on_the_same_images_is_surer_than_two_separate_intervals_suggest():
    """Before and after share their images, so the change's interval resamples the same images for both: with
    passes that agree on most rows it is far narrower than the two accuracies' intervals would make it look."""
    rng = random.Random(6)
    images = [f"image{k // 3}" for k in range(150)]  # 50 images, 3 questions each
    before = [float(rng.random() < 0.5) for _ in images]
    after = [1.0 if b or rng.random() < 0.4 else 0.0 for b in before]  # after fixes some, breaks none
    change = clustered_change(before, after, images)
    assert change["difference"] == pytest.approx(sum(after) / 150 - sum(before) / 150)
    low, high = change["ci95"]
    assert 0 < low < change["difference"] < high  # no question got worse: the change is surely positive
    # as if the two passes had been measured on different images: the widths add in quadrature
    unpaired = sum((h - lo) ** 2 for lo, h in (clustered_interval(before, images), clustered_interval(after, images)))
    assert high - low < 0.8 * unpaired ** 0.5
    assert clustered_change(before + before, after + after, images + images) == change  # copies add nothing
    assert clustered_change(before, before, images) == {"difference": 0.0, "ci95": [0.0, 0.0]}
