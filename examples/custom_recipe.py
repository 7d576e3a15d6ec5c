"""A recipe of your own in ~30 lines: fractured vs. not fractured, from folders of your X-rays.

Layout: DATA/<class>/{Train,Test}/*.png, one folder per class (here: "fractured", "not fractured").

    python examples/custom_recipe.py --data_dir DATA --model tiny:mistral3 --max_steps 10 --output_dir runs/mine

Every option of `python -m unsloth_med.recipes.bone_fracture --help` works here too.
"""
from unsloth_med.cli import recipe_main
from unsloth_med.recipes.base import DataSource, Recipe

LABELS = ("fractured", "not fractured")

RECIPE = Recipe(
    name="fracture_yes_no",
    task="classification",
    instruction=f"Is there a bone fracture in this X-ray? Reply with ONLY one of: {', '.join(LABELS)}.",
    source=DataSource(kind="class_folders", train_split="Train", test_split="Test",
                      attribution="Your own images: say where they come from and under which license."),
    labels=LABELS,
    default_model="unsloth/Ministral-3-3B-Instruct-2512",
    default_model_4bit="unsloth/Ministral-3-3B-Instruct-2512-unsloth-bnb-4bit",
    image_size=448,
    max_new_tokens=6,
)

if __name__ == "__main__":
    recipe_main(RECIPE)
