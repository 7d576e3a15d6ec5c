"""Bone-fracture classification: which of 10 fracture types does this X-ray show?

Data: Kaggle `pkdarabi/bone-break-classification-image-dataset` (989 train / 140 test X-rays,
one folder per class). The dataset's classes, layout and instruction live in data/bone_break.py, which
the demo's generator and tiny models share.
"""
from ..data.bone_break import ATTRIBUTION, CLASSES, INSTRUCTION, KAGGLE_ID, LAYOUT, SPLIT_FOLDERS
from .base import DataSource, Recipe

SOURCE = DataSource(
    kind="kaggle_folders",
    id=KAGGLE_ID,
    layout=LAYOUT,
    target_column="label",
    train_split=SPLIT_FOLDERS[0],
    test_split=SPLIT_FOLDERS[1],
    attribution=ATTRIBUTION,
)

RECIPE = Recipe(
    name="bone_fracture",
    task="classification",
    instruction=INSTRUCTION,
    source=SOURCE,
    labels=CLASSES,
    default_model="unsloth/Ministral-3-14B-Instruct-2512",
    default_model_4bit="unsloth/Ministral-3-14B-Instruct-2512-unsloth-bnb-4bit",
    image_size=512,
    max_new_tokens=12,
)

if __name__ == "__main__":
    from ..cli import recipe_main

    recipe_main(RECIPE)
