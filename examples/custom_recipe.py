"""A recipe of your own in ~40 lines: three fracture patterns, from folders of your X-rays.

Layout: DATA/<class>/{Train,Test}/*.png, one folder per class ("avulsion", "greenstick", "spiral").
No such X-rays at hand? `--make_data DATA` draws generated ones (cartoons of the three patterns, from
unsloth_med.data.synthetic) in that layout, so the whole job runs offline on a CPU:

    python examples/custom_recipe.py --make_data data/three-patterns
    python examples/custom_recipe.py --data_dir data/three-patterns --model tiny:mistral3 --max_steps 10 \
        --output_dir runs/mine

Every option of `python -m unsloth_med.recipes.bone_fracture --help` works here too.
"""
import sys
from pathlib import Path

from unsloth_med.cli import recipe_main
from unsloth_med.recipes.base import DataSource, Recipe

LABELS = ("avulsion", "greenstick", "spiral")

RECIPE = Recipe(
    name="three_patterns",
    task="classification",
    instruction=f"Which fracture pattern does this X-ray show? Reply with ONLY one of: {', '.join(LABELS)}.",
    source=DataSource(kind="class_folders", train_split="Train", test_split="Test",
                      attribution="Your own images: say where they come from and under which license."),
    labels=LABELS,
    default_model="unsloth/Ministral-3-3B-Instruct-2512",
    default_model_4bit="unsloth/Ministral-3-3B-Instruct-2512-unsloth-bnb-4bit",
    image_size=448,
    max_new_tokens=6,
)


def make_data(folder: str | Path, *, train: int = 40, test: int = 8, size: int = 64) -> Path:
    """Generated X-rays of the three patterns in this recipe's layout (deterministic)."""
    import numpy as np

    from unsloth_med.data.synthetic import draw_fracture

    drawn = {"avulsion": "Avulsion fracture", "greenstick": "Greenstick fracture", "spiral": "Spiral Fracture"}
    for k, label in enumerate(LABELS):
        for split, count in (("Train", train), ("Test", test)):
            out = Path(folder, label, split)
            out.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([k, count])
            for i in range(count):
                draw_fracture(drawn[label], rng, size, pose_jitter=0.0).save(out / f"{label}_{i:03d}.png")
    return Path(folder)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make_data"] and len(sys.argv) == 3:
        print(f"wrote {make_data(sys.argv[2])}: train with --data_dir {sys.argv[2]}")
    else:
        recipe_main(RECIPE)
