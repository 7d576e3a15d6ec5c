"""Radiology visual question answering: one question about a radiology image, a short answer.

Data: Hugging Face `flaviagiammarino/vqa-rad` (image, question, answer; 315 images, 2,248 questions,
closed yes/no and open ones). Its own test questions reuse training images, so a fair run re-splits
by image: `--split_by image`. Scored per answer type (evaluate/vqa.py): closed accuracy, open exact
match, recall, token F1, BLEU-1.

    python -m unsloth_med.recipes.radiology_vqa --demo --output_dir runs/vqa-demo   # offline, CPU
    python -m unsloth_med.recipes.radiology_vqa --quick --split_by image            # 30 steps, GPU
"""
from .base import Recipe, TableSource

INSTRUCTION = (
    "You are an expert radiologist. Answer the question about this image in as few words as possible "
    "(yes or no for a yes/no question).\nQuestion: {question}"
)

SOURCE = TableSource(
    id="flaviagiammarino/vqa-rad",
    image_column="image",
    question_column="question",
    answer_column="answer",
    attribution="VQA-RAD (Lau et al. 2018, Hugging Face flaviagiammarino/vqa-rad), CC0 1.0.",
)

RECIPE = Recipe(
    name="radiology_vqa",
    task="vqa",
    instruction=INSTRUCTION,
    source=SOURCE,
    default_model="unsloth/Ministral-3-14B-Instruct-2512",
    default_model_4bit="unsloth/Ministral-3-14B-Instruct-2512-unsloth-bnb-4bit",
    image_size=512,
    max_new_tokens=16,
)

if __name__ == "__main__":
    from ..cli import recipe_main

    recipe_main(RECIPE)
