"""A dataset summary a person can check at a glance: sizes, class counts, a grid of samples."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .images import column_values, load_image


def class_counts(dataset) -> dict[str, int]:
    return dict(sorted(Counter(column_values(dataset, "target")).items()))


def summarize(recipe, splits: dict, out_dir: Path | None = None, *, image_size: int | None = None) -> dict:
    """Sizes and (classification) per-class counts; writes data_summary.json and samples.png to out_dir."""
    summary = {"recipe": recipe.name, "sizes": {name: len(ds) for name, ds in splits.items()}, "image_size": image_size}
    if recipe.is_classification:
        summary["class_counts"] = {name: class_counts(ds) for name, ds in splits.items()}
    if out_dir is not None:
        out_dir = Path(out_dir)
        (out_dir / "data_summary.json").write_text(json.dumps(summary, indent=1))
        sample_grid(recipe, splits["train"], out_dir / "samples.png")
    return summary


def sample_grid(recipe, dataset, path: Path, *, per_class: int = 3, max_images: int = 30) -> Path:
    """A PNG grid of training images with their labels (per class for classification)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = column_values(dataset, "target")
    if recipe.is_classification:
        picks = [i for label in recipe.labels or sorted(set(targets))
                 for i in [j for j, t in enumerate(targets) if t == label][:per_class]]
    else:
        picks = list(range(min(len(dataset), 12)))
    picks = picks[:max_images]
    cols = per_class if recipe.is_classification else 4
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        ax.imshow(load_image(dataset[i]["image"], 256))
        ax.set_title(str(targets[i])[:28], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
