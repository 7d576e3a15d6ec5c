"""The run's report: metrics.json, report.md and PNG plots, before vs after training.

    metrics.json        {"recipe", "task", "before": {metrics}, "after": {metrics}, "n_test", "mode", **extra};
                        classification adds "after_vs_before" (the paired test) and, when test images copy
                        training images, "without_leaked_test_images" (both passes scored without them)
    report.md           a before/after table with 95% intervals, the plots, example predictions, leaked test images
    loss.png            training loss per step (from the trainer's log history)
    confusion_before.png, confusion_after.png, per_class_f1.png   (classification)

`before` / `after` are what `evaluate()` returns ({"metrics", "predictions"}), or a bare metrics dict,
or None when that side was not evaluated.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

HEADLINE = {
    "classification": (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")),
    "captioning": (("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("bertscore", "BERTScore F1"),
                   ("exact_match", "Exact match"), ("price_mae", "Price MAE")),  # rows only where present
    "vqa": (("overall_accuracy", "Accuracy, all questions"), ("closed_accuracy", "Closed accuracy (generated)"),
            ("closed_accuracy_scored", "Closed accuracy (label scores)"), ("open_exact_match", "Open exact match"),
            ("open_recall", "Open recall"), ("open_token_f1", "Open token F1"), ("open_bleu1", "Open BLEU-1"),
            ("overall_token_f1", "Token F1, all"), ("question_blind_ceiling", "Ceiling: image only (question-blind)"),
            ("image_blind_ceiling", "Ceiling: question only (image-blind)")),
}


def _metrics(result: dict | None) -> dict | None:
    if result is None:
        return None
    return result.get("metrics", result) if isinstance(result, dict) and "metrics" in result else result


def _predictions(result: dict | None) -> list[dict]:
    if isinstance(result, dict) and isinstance(result.get("predictions"), list):
        return result["predictions"]
    return []


def _task_of(*metrics: dict | None) -> str:
    for m in metrics:
        if m and "overall_accuracy" in m:
            return "vqa"
        if m and ("accuracy" in m or "confusion_matrix" in m):
            return "classification"
        if m and ("bleu" in m or "rougeL" in m):
            return "captioning"
    return "classification"


PERCENT_SCALE = ("bleu",)  # metrics on a 0-100 scale: two decimals; the others (0-1): four


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rows(before: dict | None, after: dict | None, summary: dict | None = None) -> list[tuple[str, str, str, str]]:
    b, a = _metrics(before), _metrics(after)
    change_of = (summary or {}).get("after_vs_before") or {}
    task = _task_of(a, b)
    rows = []
    for key, name in HEADLINE[task]:
        vb, va = (b or {}).get(key), (a or {}).get(key)
        if vb is None and va is None:
            continue
        digits = 2 if key in PERCENT_SCALE else 4
        change = "-"
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            change = f"{va - vb:+.{digits}f}"
        rows.append((name, _fmt(vb, digits), _fmt(va, digits), change))
        ib, ia = (b or {}).get(f"{key}_ci95"), (a or {}).get(f"{key}_ci95")
        ic = (change_of.get(key) or {}).get("ci95")
        if ib or ia or ic:
            rows.append(("  95% interval", _interval(ib), _interval(ia), _interval(ic, signed=True)))
    for key, name in (("unparseable", "Unparseable answers"), ("cut_off", "Answers cut off at max_new_tokens")):
        vb, va = (b or {}).get(key), (a or {}).get(key)
        if (vb is not None or va is not None) and (key != "cut_off" or vb or va):  # cut_off: only when any was
            rows.append((name, _fmt(vb), _fmt(va), "-"))
    n = (a or b or {}).get("n")
    if n is not None:
        rows.append(("Test examples", _fmt((b or {}).get("n")), _fmt((a or {}).get("n")), "-"))
    return rows


def _interval(ci: Sequence[float] | None, signed: bool = False) -> str:
    if not ci:
        return "-"
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"[{form.format(ci[0])}, {form.format(ci[1])}]"


def comparisons(before: dict | None, after: dict | None, leaks: Sequence[dict] | None) -> dict:
    """After against before on the same examples (`after_vs_before`: uncertainty.paired_change for classification,
    vqa.paired_vqa_change for VQA); for classification, both passes scored again without the test examples whose
    image copies a training image (`without_leaked_test_images`): those measure memory, not generalisation.
    Predictions whose ids repeat cannot be paired: the report then says why it has no comparison, and is written."""
    from .uncertainty import RepeatedIds

    try:
        return _comparisons(before, after, leaks)
    except RepeatedIds as error:
        log.warning("No paired comparison of after against before: %s", error)
        return {"no_comparison": str(error)}


def _comparisons(before: dict | None, after: dict | None, leaks: Sequence[dict] | None) -> dict:
    side = _metrics(after) or _metrics(before) or {}
    if _task_of(side) == "vqa":
        from .vqa import paired_vqa_change

        change = paired_vqa_change(_predictions(before), _predictions(after))
        return {"after_vs_before": change} if change else {}
    labels = side.get("labels")
    if not labels:
        return {}
    from .uncertainty import paired_change

    out: dict[str, Any] = {}
    found_before, found_after = _predictions(before), _predictions(after)
    if found_before and found_after:
        out["after_vs_before"] = paired_change(found_before, found_after, labels)
    gone = {str(entry.get("test_id", entry.get("test"))) for entry in leaks or ()}
    held = _without(gone, found_before, found_after, labels, side.get("mode") or "score") if gone else None
    if held:
        out["without_leaked_test_images"] = held
    return out


def _without(gone: set[str], found_before: list[dict], found_after: list[dict], labels, mode: str) -> dict | None:
    """The headline scores of both passes on the examples whose id is not in `gone`; None when none was."""
    from .classify import classification_metrics
    from .uncertainty import paired_change

    kept = {"before": [p for p in found_before if str(p.get("id")) not in gone],
            "after": [p for p in found_after if str(p.get("id")) not in gone]}
    removed = max(len(found_before) - len(kept["before"]), len(found_after) - len(kept["after"]))
    if not removed:
        return None
    held: dict[str, Any] = {"leaked_removed": removed}
    for name, rows in kept.items():
        if rows:  # macro-F1 over the classes these examples have (targets, predictions), as on a whole split
            scores = classification_metrics([p["target"] for p in rows], [p["prediction"] for p in rows], labels,
                                            mode=mode)
            held[name] = {key: scores[key] for key in ("n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95")}
    if kept["before"] and kept["after"]:
        held["after_vs_before"] = paired_change(kept["before"], kept["after"], labels)
    return held


def comparison_lines(summary: dict | None) -> list[str]:
    """The sentences under the table: the paired test, and the scores without the leaked test images."""
    lines = []
    change = (summary or {}).get("after_vs_before")
    if change and "images" in change:  # VQA
        lines.append(f"After against before on the same {change['n']} questions about {change['images']} images: "
                     f"{change['right_only_after']} right only after, {change['right_only_before']} right only "
                     "before. Intervals are 95%, a bootstrap over images (the questions about one image are "
                     "resampled together).")
    elif change:
        lines.append(f"After against before on the same {change['n']} examples: {change['right_only_after']} right "
                     f"only after, {change['right_only_before']} right only before; McNemar exact "
                     f"p = {change['mcnemar_exact_p']:.2g}. Intervals are 95%: Wilson for accuracy, a bootstrap over "
                     "the examples for the rest.")
    if (summary or {}).get("no_comparison"):
        lines.append(f"No paired comparison of after against before: {summary['no_comparison']}.")
    held = (summary or {}).get("without_leaked_test_images")
    if held:
        parts = [f"{name} {_fmt(held[name]['accuracy'])} {_interval(held[name]['accuracy_ci95'])}"
                 for name in ("before", "after") if held.get(name)]
        n = (held.get("after") or held.get("before") or {}).get("n")
        lines.append(f"Without the {held['leaked_removed']} test examples whose image copies a training image "
                     f"({n} left), accuracy: {', '.join(parts)}.")
    return lines


def format_table(before: dict | None, after: dict | None, summary: dict | None = None) -> str:
    """A short plain-text table of the headline metrics, before vs after training, with their 95% intervals.
    `summary`: what write_report returned, for the paired test and the scores without leaked test images."""
    rows = [("metric", "before", "after", "change")] + _rows(before, after, summary)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    mode = (_metrics(after) or _metrics(before) or {}).get("mode")
    title = f"Test-set metrics ({mode})" if mode else "Test-set metrics"
    return "\n".join([title, *lines, *comparison_lines(summary)])


def _markdown_table(before: dict | None, after: dict | None, summary: dict | None = None) -> str:
    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a.strip()} | {b} | {c} | {d} |" for a, b, c, d in _rows(before, after, summary)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def moving_average_label(steps, points: int) -> str:
    """The legend of a moving average over `points` logged losses: in steps too when losses are logged every N steps."""
    gaps = sorted(b - a for a, b in zip(steps, steps[1:]))
    every = gaps[len(gaps) // 2] if gaps else 1
    if every <= 1:
        return f"moving average ({points} steps)"
    return f"moving average ({points} logged points, {points * every} steps)"


def plot_loss(log_history: Iterable[dict], path: Path) -> Path | None:
    points = [(e["step"], e["loss"]) for e in log_history
              if isinstance(e, dict) and "loss" in e and "step" in e and e["loss"] is not None]
    if not points:
        return None
    points.sort()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, losses = zip(*points)
    ax.plot(steps, losses, marker="o" if len(points) < 40 else None, markersize=3, linewidth=1.2, label="training loss")
    if len(points) >= 10:  # a moving average reads better than noisy per-step values
        k = max(3, len(points) // 10)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, linewidth=2, label=moving_average_label(steps, k))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(metrics: dict, path: Path, title: str) -> Path | None:
    matrix = metrics.get("confusion_matrix")
    labels = list(metrics.get("labels") or [])
    if not matrix or not labels:
        return None
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    columns = list(labels)
    unparseable = metrics.get("unparseable_by_class")
    if unparseable and sum(unparseable.values()):
        cm = np.hstack([cm, np.asarray([[unparseable.get(label, 0)] for label in labels], dtype=float)])
        columns.append("(unparseable)")
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    plt = _plt()
    size = 1.4 + 0.55 * len(columns)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), [_short(c) for c in columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), [_short(c) for c in labels], fontsize=8)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = metrics.get("accuracy")
    ax.set_title(f"{title}" + (f" (accuracy {acc:.3f})" if isinstance(acc, float) else ""), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_class_f1(before: dict | None, after: dict | None, path: Path) -> Path | None:
    sides = [(name, m) for name, m in (("before", before), ("after", after)) if m and m.get("per_class")]
    if not sides:
        return None
    labels = list((sides[-1][1].get("labels") or sides[-1][1]["per_class"].keys()))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels) + 2), 4))
    width = 0.8 / len(sides)
    for k, (name, m) in enumerate(sides):
        values = [m["per_class"].get(label, {}).get("f1", 0.0) for label in labels]
        xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, values, width=width, label=f"{name} (macro-F1 {m.get('macro_f1', 0):.3f})")
    ax.set_xticks(range(len(labels)), [_short(c) for c in labels], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title("Per-class F1")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_answer_type(before: dict | None, after: dict | None, path: Path) -> Path | None:
    """Accuracy, token F1 and BLEU-1 per answer type (closed, open, overall), before and after."""
    plt = _plt()
    if plt is None or not (after or before):
        return None
    groups = [(kind, m) for kind, m in ((after or before).get("per_type", {}).items())] + [("overall", None)]
    names = ("accuracy", "token_f1", "bleu1")
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
    for ax, (kind, _) in zip(axes[0], groups):
        for offset, (side, m) in enumerate((("before", before), ("after", after))):
            part = (m or {}).get("overall") if kind == "overall" else (m or {}).get("per_type", {}).get(kind)
            values = [float((part or {}).get(n) or 0.0) for n in names]
            ax.bar([i + 0.4 * offset for i in range(len(names))], values, width=0.4, label=side)
        n = ((after or before).get("overall") if kind == "overall" else (after or before)["per_type"][kind]).get("n")
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_ylim(0, 1)
        ax.set_title(f"{kind} (n={n})")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(text: str, n: int = 24) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- report
def write_report(run_dir, recipe, before: dict | None, after: dict | None, *, log_history: Sequence[dict] = (),
                 extra: dict | None = None) -> dict:
    """Write metrics.json, report.md and the PNG plots into run_dir; returns the metrics.json content."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mb, ma = _metrics(before), _metrics(after)
    latest = ma or mb or {}
    metrics = {
        "recipe": getattr(recipe, "name", None),
        "task": getattr(recipe, "task", None) or _task_of(ma, mb),
        "before": mb,
        "after": ma,
        "n_test": latest.get("n"),
        "mode": latest.get("mode"),
        **(extra or {}),
    }
    if metrics["task"] in ("classification", "vqa"):
        metrics.update(comparisons(before, after, _leaks(metrics)))
    plots: dict[str, Path | None] = {"loss": plot_loss(log_history or (), run_dir / "loss.png")}
    if metrics["task"] == "classification":
        for side, m in (("before", mb), ("after", ma)):
            plots[f"confusion_{side}"] = plot_confusion(m, run_dir / f"confusion_{side}.png",
                                                        f"Confusion matrix, {side} training") if m else None
        plots["per_class_f1"] = plot_per_class_f1(mb, ma, run_dir / "per_class_f1.png")
    if metrics["task"] == "vqa":
        plots["per_answer_type"] = plot_per_answer_type(mb, ma, run_dir / "per_answer_type.png")
    metrics["plots"] = {name: p.name for name, p in plots.items() if p is not None}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    (run_dir / "report.md").write_text(_report_markdown(recipe, metrics, before, after, plots))
    return metrics


def _report_markdown(recipe, metrics: dict, before, after, plots: dict[str, Path | None]) -> str:
    name = metrics.get("recipe") or "run"
    lines = [f"# {name}: before vs after fine-tuning", ""]
    task = metrics.get("task")
    lines.append(f"Task: {task}. Test examples: {_fmt(metrics.get('n_test'))}. "
                 f"Evaluation: {_mode_words(metrics.get('mode'), task)}.")
    attribution = getattr(getattr(recipe, "source", None), "attribution", "")
    if attribution:
        lines += ["", f"Data: {attribution}"]
    lines += ["", "## Results", "", _markdown_table(before, after, metrics), ""]
    lines += [f"- {line}" for line in comparison_lines(metrics)]
    for side, m in (("before", metrics.get("before")), ("after", metrics.get("after"))):
        if m and m.get("unparseable"):
            lines.append(f"- {side}: {m['unparseable']} of {m.get('n')} answers named no class (counted as wrong).")
        if m and m.get("cut_off"):
            lines.append(f"- {side}: {m['cut_off']} of {m.get('n')} answers were cut off at max_new_tokens "
                         f"({m.get('max_new_tokens')}) before the model ended them; their scores measure the budget: "
                         "raise --max_new_tokens.")
        if m and m.get("bertscore_note"):
            lines.append(f"- {side}: {m['bertscore_note']}")
    if metrics.get("before") is None:
        lines.append("- The base model was not evaluated before training.")
    lines.append("")
    if plots.get("loss"):
        lines += ["## Training loss", "", "![training loss](loss.png)", ""]
    if task == "classification":
        shown = [(k, p) for k, p in plots.items() if k.startswith("confusion_") and p]
        if shown:
            lines += ["## Confusion matrices", "", "Rows: true class; columns: predicted class.", ""]
            lines += [f"![{k.replace('_', ' ')}]({p.name})" for k, p in shown] + [""]
        if plots.get("per_class_f1"):
            lines += ["## Per-class F1", "", "![per-class F1](per_class_f1.png)", ""]
            lines += [_per_class_table(metrics.get("before"), metrics.get("after")), ""]
    else:
        from .caption import examples_table

        preds = _predictions(after) or _predictions(before)
        if preds:
            lines += ["## Example predictions" + (" (after training)" if _predictions(after) else ""), "",
                      examples_table(preds), ""]
    leaks = _leaks(metrics)
    if leaks is not None:
        lines += ["## Train/test leakage", ""]
        if leaks:
            lines.append(f"{len(leaks)} test images are near-identical copies of training images "
                         "(64x64 grayscale mean absolute difference under 2/255); scores on them measure memory:")
            lines += ["", "| test image | training image | MAD (grey levels) |", "|---|---|---:|"]
            lines += [f"| {Path(str(e.get('test'))).name} | {Path(str(e.get('train'))).name} "
                      f"| {e.get('mad', 0) * 255:.2f} |"
                      for e in leaks[:50]]
        else:
            lines.append("No test image is a near-copy of a training image.")
        lines.append("")
    return "\n".join(lines)


def _leaks(metrics: dict) -> list | None:
    if isinstance(metrics.get("leaked_test_images"), list):
        return metrics["leaked_test_images"]
    data = metrics.get("data")
    if isinstance(data, dict) and isinstance(data.get("leaked_test_images"), list):
        return data["leaked_test_images"]
    return None


def _per_class_table(before: dict | None, after: dict | None) -> str:
    side = after or before or {}
    labels = list(side.get("labels") or (side.get("per_class") or {}).keys())
    lines = ["| class | support | F1 before | F1 after |", "|---|---:|---:|---:|"]
    for label in labels:
        fb = ((before or {}).get("per_class") or {}).get(label, {}).get("f1")
        fa = ((after or {}).get("per_class") or {}).get(label, {}).get("f1")
        support = (side.get("per_class") or {}).get(label, {}).get("support")
        lines.append(f"| {label} | {_fmt(support)} | {_fmt(fb)} | {_fmt(fa)} |")
    return "\n".join(lines)


def _mode_words(mode: str | None, task: str | None) -> str:
    if task == "captioning":
        return "greedy generation"
    return {"score": "label scoring (each class ranked by its likelihood)",
            "generate": "greedy generation matched to a class"}.get(mode or "", str(mode))
