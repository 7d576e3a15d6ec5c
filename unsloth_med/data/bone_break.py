"""The bone-break X-ray dataset's facts, in one place for every layer that needs them.

The bone_fracture recipe reads the real dataset (Kaggle `pkdarabi/bone-break-classification-image-dataset`:
989 train / 140 test X-rays, one folder per class); the offline demo generates look-alikes in the same layout
(data/synthetic.py) and the tiny models' tokenizer is trained on its prompt (models/tiny.py). Kept under data/
so that data/ and models/ never import a recipe.
"""
from __future__ import annotations

KAGGLE_ID = "pkdarabi/bone-break-classification-image-dataset"
# The download's folders above the class folders, and the split folder names inside each class folder.
LAYOUT = ("Bone Break Classification", "Bone Break Classification")
SPLIT_FOLDERS = ("Train", "Test")

# The class folder names, which are the labels.
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

# Strict, because the metric is exact match on the class name: the base model must answer with the name only.
INSTRUCTION = (
    "You are an expert radiologist. Look at this X-ray and classify the bone fracture into exactly ONE "
    f"of these classes: {', '.join(CLASSES)}. Reply with ONLY the class name, exactly as written above: "
    "no explanations, no markdown, no punctuation."
)

ATTRIBUTION = (
    "Bone Break Classification (Kaggle pkdarabi/bone-break-classification-image-dataset; "
    "Roboflow Universe curso-rphcb/bone-break-classification), CC BY 4.0. Many images are "
    "web-collected figures: use for research and evaluation only."
)
