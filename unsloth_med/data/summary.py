"""A dataset summary a person can check at a glance: sizes, class counts, a grid of samples."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from PIL import ImageOps

from ..errors import ImageError
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


def sample_grid(recipe, dataset, path: Path, *, per_class: int = 3, max_images: int = 30, cell: int = 256) -> Path:
    """A PNG grid of training images with their labels (per class for classification).

    The images are pasted into one picture and drawn on one axes: thirty axes with titles took matplotlib 1.6-1.9 s
    of every run (laying out titles and ticks) on a 2-core CPU, the montage 0.7 s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets = column_values(dataset, "target")
    if recipe.is_classification:
        picks = [i for label in recipe.labels or sorted(set(targets))
                 for i in [j for j, t in enumerate(targets) if t == label][:per_class]]
    else:
        picks = list(range(min(len(dataset), 12)))
    picks = picks[:max_images]
    cols = per_class if recipe.is_classification else 4
    rows = max(1, -(-len(picks) // cols))
    band, gutter = cell // 8, cell // 32  # a white band above each image for its label; white between images
    canvas = np.full((rows * (cell + band), cols * cell, 3), 255, dtype=np.uint8)
    fig = plt.figure(figsize=(cols * 2.4, rows * 2.4 * (cell + band) / cell))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for n, i in enumerate(picks):
        top, left = divmod(n, cols)
        top, left = top * (cell + band) + band, left * cell
        try:  # scaled to fill its cell (small images grow, as each axes grew them before), centred in it
            image = np.asarray(ImageOps.contain(load_image(dataset[i]["image"]), (cell - 2 * gutter,) * 2))
        except ImageError:  # a large split is checked lazily (data/lazy.py): training skips what cannot be read
            ax.text(left + cell / 2, top - band / 2, f"{str(targets[i])[:20]} (unreadable)", ha="center",
                    va="center", fontsize=7)
            continue
        y, x = top + (cell - image.shape[0]) // 2, left + (cell - image.shape[1]) // 2
        canvas[y:y + image.shape[0], x:x + image.shape[1]] = image
        ax.text(left + cell / 2, top - band / 2, str(targets[i])[:28], ha="center", va="center", fontsize=7)
    ax.imshow(canvas, interpolation="antialiased")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
