"""The before/after report: metrics.json, report.md, PNG plots, and the printed table."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from unsloth_med.evaluate import classification_metrics
from unsloth_med.evaluate.report import format_table, write_report
from unsloth_med.recipes.bone_fracture import RECIPE
from unsloth_med.recipes.radiology_caption import RECIPE as CAPTION_RECIPE

LABELS = list(RECIPE.labels)


def _result(y_pred, mode="score"):
    y_true = [LABELS[i % len(LABELS)] for i in range(len(y_pred))]
    preds = [{"id": f"t{i}", "target": t, "prediction": p} for i, (t, p) in enumerate(zip(y_true, y_pred))]
    return {"metrics": classification_metrics(y_true, y_pred, LABELS, mode=mode), "predictions": preds}


@pytest.fixture
def before_after():
    n = 20
    before = _result([LABELS[0]] * n)  # the base model answers one class
    after = _result([LABELS[i % len(LABELS)] if i % 5 else LABELS[1] for i in range(n)])
    return before, after


def _open_png(path):
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_classification_report_files(tmp_path, before_after):
    before, after = before_after
    history = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-4} for s in range(1, 13)] + [{"train_runtime": 5.0}]
    leaks = [{"test": "a/Test/x.jpg", "train": "a/Train/y.jpg", "mad": 0.002}]
    metrics = write_report(tmp_path, RECIPE, before, after, log_history=history,
                           extra={"data": {"sizes": {"train": 40, "test": 20}, "leaked_test_images": leaks},
                                  "wall_seconds": 12.5})
    for name in ("metrics.json", "report.md", "loss.png", "confusion_before.png", "confusion_after.png",
                 "per_class_f1.png"):
        assert (tmp_path / name).is_file(), name
    for name in ("loss.png", "confusion_before.png", "confusion_after.png", "per_class_f1.png"):
        _open_png(tmp_path / name)

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["n_test"] == 20 and saved["mode"] == "score" and saved["wall_seconds"] == 12.5
    assert saved["before"]["accuracy"] == pytest.approx(0.1) and saved["after"]["accuracy"] == pytest.approx(0.8)
    assert "predictions" not in saved["before"]  # metrics only; predictions live in eval_*.json

    report = (tmp_path / "report.md").read_text()
    assert "| Accuracy | 0.1000 | 0.8000 | +0.7000 |" in report
    for png in ("loss.png", "confusion_before.png", "confusion_after.png", "per_class_f1.png"):
        assert f"]({png})" in report
    assert "x.jpg" in report and "1 test images are near-identical" in report
    assert RECIPE.source.attribution in report


def test_generate_mode_confusion_shows_unparseable_answers(tmp_path):
    after = _result([None, LABELS[1], LABELS[2], None], mode="generate")
    write_report(tmp_path, RECIPE, None, after)
    _open_png(tmp_path / "confusion_after.png")
    _open_png(tmp_path / "per_class_f1.png")
    assert not (tmp_path / "confusion_before.png").exists() and not (tmp_path / "loss.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "2 of 4 answers named no class" in report and "not evaluated before training" in report


def test_captioning_report_has_examples_and_no_confusion(tmp_path):
    preds = [{"id": f"c{i}", "target": f"reference caption {i}", "prediction": f"predicted caption {i}"}
             for i in range(3)]
    before = {"metrics": {"n": 3, "mode": "generate", "bleu": 1.5, "rougeL": 0.1, "bertscore": None,
                          "bertscore_note": "BERTScore skipped: not installed."}, "predictions": preds}
    after = {"metrics": {"n": 3, "mode": "generate", "bleu": 21.25, "rougeL": 0.42, "bertscore": None},
             "predictions": preds}
    metrics = write_report(tmp_path, CAPTION_RECIPE, before, after, log_history=[{"step": 1, "loss": 2.0}])
    assert metrics["task"] == "captioning" and metrics["after"]["bleu"] == 21.25
    assert not list(tmp_path.glob("confusion_*.png")) and not (tmp_path / "per_class_f1.png").exists()
    _open_png(tmp_path / "loss.png")
    report = (tmp_path / "report.md").read_text()
    assert "| BLEU | 1.50 | 21.25 | +19.75 |" in report and "| ROUGE-L | 0.1000 | 0.4200 | +0.3200 |" in report
    assert "| c0 | reference caption 0 | predicted caption 0 |" in report
    assert "BERTScore skipped" in report


def test_format_table(before_after):
    before, after = before_after
    table = format_table(before, after)
    lines = table.splitlines()
    assert lines[0] == "Test-set metrics (score)"
    assert any(line.startswith("Accuracy") and line.split()[1:] == ["0.1000", "0.8000", "+0.7000"] for line in lines)
    assert any(line.startswith("Macro-F1") for line in lines)
    only_after = format_table(None, after["metrics"])  # bare metrics dicts work too
    assert any(line.startswith("Accuracy") and line.split()[1:] == ["-", "0.8000", "-"]
               for line in only_after.splitlines())
    generated = format_table(None, _result([None, LABELS[1]], mode="generate"))
    assert any(line.startswith("Unparseable answers") and line.split()[-2:] == ["1", "-"]
               for line in generated.splitlines())


def test_the_table_gives_95_percent_intervals_and_the_paired_test(tmp_path, before_after):
    before, after = before_after
    metrics = write_report(tmp_path, RECIPE, before, after)
    change = metrics["after_vs_before"]
    assert change["n"] == 20 and change["right_only_after"] == 16 and change["right_only_before"] == 2
    lines = format_table(before, after, metrics).splitlines()
    intervals = [line.split() for line in lines if line.strip().startswith("95% interval")]
    assert len(intervals) == 2  # accuracy, macro-F1
    accuracy_row = " ".join(intervals[0][2:])
    low, high = after["metrics"]["accuracy_ci95"]
    assert f"[{low:.3f}, {high:.3f}]" in accuracy_row
    low, high = change["accuracy"]["ci95"]
    assert accuracy_row.endswith(f"[{low:+.3f}, {high:+.3f}]")
    assert any("16 right only after, 2 right only before; McNemar exact p = 0.0013" in line for line in lines)
    report = (tmp_path / "report.md").read_text()
    assert f"| 95% interval | [{before['metrics']['accuracy_ci95'][0]:.3f}," in report
    assert "McNemar exact p = 0.0013" in report


def test_scores_without_the_leaked_test_images_are_those_of_the_other_examples(tmp_path, before_after):
    before, after = before_after
    leaks = [{"test_id": "t3", "train_id": "r1", "mad": 0.001}, {"test_id": "t7", "train_id": "r2", "mad": 0.003}]
    metrics = write_report(tmp_path, RECIPE, before, after, extra={"data": {"leaked_test_images": leaks}})
    held = metrics["without_leaked_test_images"]
    assert held["leaked_removed"] == 2
    for side, result in (("before", before), ("after", after)):
        rows = [p for p in result["predictions"] if p["id"] not in ("t3", "t7")]
        expected = classification_metrics([p["target"] for p in rows], [p["prediction"] for p in rows],
                                          sorted({p["target"] for p in rows}, key=LABELS.index))
        assert held[side]["n"] == 18
        assert held[side]["accuracy"] == pytest.approx(expected["accuracy"])
        assert held[side]["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert held["after_vs_before"]["n"] == 18
    sentence = (f"Without the 2 test examples whose image copies a training image (18 left), accuracy: before "
                f"{held['before']['accuracy']:.4f}")
    assert sentence in format_table(before, after, metrics) and sentence in (tmp_path / "report.md").read_text()
    # leaks that name no scored example (dropped before evaluation) change nothing
    dropped = write_report(tmp_path, RECIPE, before, after,
                           extra={"data": {"leaked_test_images": [{"test_id": "gone", "mad": 0.0}]}})
    assert "without_leaked_test_images" not in dropped
