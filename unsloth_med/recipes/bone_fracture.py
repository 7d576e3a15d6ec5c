"""Bone-fracture classification: which of 10 fracture types does this X-ray show?

Data: Kaggle `pkdarabi/bone-break-classification-image-dataset` (989 train / 140 test X-rays,
one folder per class). The instruction is strict because the metric is exact match on the class
name: the base model must answer with the name and nothing else.
"""
from .base import DataSource, Recipe

CLASSES = (
    "Avulsion fracture",
    "Comminuted fracture",
    "Fracture Dislocation",
    "Greenstick fracture",
    "Hairline Fracture",
    "Impacted fracture",
    "Longitudinal fracture",
    "Oblique fracture",
    "Pathological fracture",
    "Spiral Fracture",
)

INSTRUCTION = (
    "You are an expert radiologist. Look at this X-ray and classify the bone fracture into exactly ONE "
    f"of these classes: {', '.join(CLASSES)}. Reply with ONLY the class name, exactly as written above: "
    "no explanations, no markdown, no punctuation."
)

SOURCE = DataSource(
    kind="kaggle_folders",
    id="pkdarabi/bone-break-classification-image-dataset",
    layout=("Bone Break Classification", "Bone Break Classification"),
    target_column="label",
    train_split="Train",
    test_split="Test",
    attribution=(
        "Bone Break Classification (Kaggle pkdarabi/bone-break-classification-image-dataset; "
        "Roboflow Universe curso-rphcb/bone-break-classification), CC BY 4.0. Many images are "
        "web-collected figures: use for research and evaluation only."
    ),
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
