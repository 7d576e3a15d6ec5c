"""Metrics on the edge cases real test splits have: text in other scripts (SLAKE is English and Chinese), a recipe
class absent from the test split, predictions whose ids repeat. References are sklearn, rouge_score, sacrebleu and
hand computation."""
from __future__ import annotations

import json
import math

import pytest
from sklearn.metrics import f1_score

from unsloth_med.evaluate import caption_metrics, classification_metrics
from unsloth_med.evaluate.report import write_report
from unsloth_med.evaluate.uncertainty import RepeatedIds, paired_change
from unsloth_med.evaluate.vqa import bleu1, normalize, token_scores, vqa_metrics
from unsloth_med.recipes.bone_fracture import RECIPE


# ----------------------------------------------------------------------------- other scripts
def test_punctuation_of_any_script_is_not_part_of_an_answer():
    assert normalize("是。") == normalize("是") == "是"
    assert normalize("¡Sí!") == "sí" and normalize("«Yes»") == "yes"
    assert normalize("The  Left-lung!") == "left lung"  # ASCII as before
    assert normalize("5×3 cm") == "5×3 cm"  # a symbol is not punctuation


def test_chinese_answers_are_scored_character_by_character():
    recall, f1 = token_scores("左肺", "左肺下叶")  # 2 of the reference's 4 characters, both predicted ones right
    assert recall == pytest.approx(2 / 4) and f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_scores("CT扫描", "ct 扫描") == (1.0, 1.0)
    assert token_scores("left lung", "the left lung") == (1.0, 1.0)  # English as before
    # BLEU-1 on the same tokens: 2 matched of 2 predicted, brevity penalty exp(1 - 4/2)
    assert bleu1(["左肺"], ["左肺下叶"]) == pytest.approx(math.exp(1 - 4 / 2))


def test_rouge_l_of_text_in_other_scripts_counts_its_characters_and_english_is_rouge_scores_own():
    from rouge_score import rouge_scorer

    assert caption_metrics(["肺部正常。"], ["肺部正常"])["rougeL"] == pytest.approx(1.0)  # was 0: no a-z0-9 tokens
    # longest common subsequence 3 of 4 characters on each side
    assert caption_metrics(["左肺正常"], ["左肺异常"])["rougeL"] == pytest.approx(0.75)
    english = ["Fractures of the distal radius, displaced.", "No acute findings; the lungs are clear.",
               "Comminuted fracturing at the femoral neck"]
    reference = ["A displaced fracture of the distal radius.", "Lungs clear, no acute finding.",
                 "Femoral neck fracture, comminuted"]
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(default.score(r, p)["rougeL"].fmeasure for p, r in zip(english, reference)) / 3
    assert caption_metrics(english, reference)["rougeL"] == pytest.approx(expected, abs=1e-12)
    mixed = caption_metrics(["Fractured 桡骨"], ["fracture of the 桡骨"])["rougeL"]  # stems the English word
    assert mixed == pytest.approx(2 * (3 / 3) * (3 / 5) / (3 / 3 + 3 / 5))


def test_label_scored_accuracy_is_given_for_closed_questions_only():
    rows = [{"answer_type": "closed", "target": "yes", "prediction": "yes", "scored": "yes"},
            {"answer_type": "open", "target": "left lung", "prediction": "left lung"}]
    m = vqa_metrics(rows)
    assert m["closed_accuracy_scored"] == 1.0 and m["per_type"]["closed"]["accuracy_scored"] == 1.0
    assert "accuracy_scored" not in m["overall"]  # was 0.5: the open question counted as a wrong label score


# ----------------------------------------------------------------------------- a class the test split lacks
def test_macro_f1_of_a_split_without_one_recipe_class_lies_inside_its_own_interval():
    labels = ["A", "B", "C"]
    targets = ["A"] * 10 + ["B"] * 10  # C is a recipe class that no test example has
    before = ["A"] * 20
    after = ["A"] * 9 + ["B"] + ["B"] * 9 + ["C"]  # one B predicted as C: C occurs, with F1 0
    b = classification_metrics(targets, before, labels)
    a = classification_metrics(targets, after, labels)
    assert b["macro_f1"] == pytest.approx(f1_score(targets, before, labels=["A", "B"], average="macro",
                                                   zero_division=0))
    assert a["macro_f1"] == pytest.approx(f1_score(targets, after, labels=labels, average="macro", zero_division=0))
    assert set(a["per_class"]) == set(labels) and a["per_class"]["C"]["support"] == 0
    for m in (b, a):
        low, high = m["macro_f1_ci95"]
        assert low <= m["macro_f1"] <= high, m
    ids = [f"x{i}" for i in range(20)]
    change = paired_change([{"id": i, "target": t, "prediction": p} for i, t, p in zip(ids, targets, before)],
                           [{"id": i, "target": t, "prediction": p} for i, t, p in zip(ids, targets, after)], labels)
    assert change["macro_f1"]["difference"] == pytest.approx(a["macro_f1"] - b["macro_f1"], abs=1e-12)
    low, high = change["macro_f1"]["ci95"]
    assert low <= change["macro_f1"]["difference"] <= high


# ----------------------------------------------------------------------------- ids that repeat
def _pass(ids, predictions, targets):
    return [{"id": i, "target": t, "prediction": p} for i, t, p in zip(ids, targets, predictions)]


def test_passes_whose_ids_repeat_are_not_paired_and_the_report_says_why(tmp_path):
    labels = list(RECIPE.labels)
    targets = [labels[i % 4] for i in range(4)]
    same = _pass([""] * 4, targets, targets)
    with pytest.raises(RepeatedIds, match=r"repeat the ids \[''\]"):
        paired_change(same, same, labels)
    before = {"metrics": classification_metrics(targets, targets, labels), "predictions": same}
    summary = write_report(tmp_path, RECIPE, before, before)
    assert "after_vs_before" not in summary and "repeat the ids" in summary["no_comparison"]
    assert "No paired comparison of after against before" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["no_comparison"] == summary["no_comparison"]
