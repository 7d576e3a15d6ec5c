"""Radiology captioning: describe a radiograph the way a radiographer would.

Data: Hugging Face `unsloth/Radiology_mini` (image, caption), the dataset of Unsloth's Llama 3.2
Vision notebook. Scored with BLEU and ROUGE-L against the reference caption.
"""
from .base import DataSource, Recipe

INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."

SOURCE = DataSource(
    kind="hf",
    id="unsloth/Radiology_mini",
    image_column="image",
    target_column="caption",
    train_split="train",
    test_split="test",
    attribution="unsloth/Radiology_mini (a sample of the ROCO radiology dataset); see its dataset card for terms.",
)

RECIPE = Recipe(
    name="radiology_caption",
    task="captioning",
    instruction=INSTRUCTION,
    source=SOURCE,
    default_model="unsloth/Llama-3.2-11B-Vision-Instruct",
    default_model_4bit="unsloth/Llama-3.2-11B-Vision-Instruct-unsloth-bnb-4bit",
    image_size=560,
    max_new_tokens=128,
)

if __name__ == "__main__":
    from ..cli import recipe_main

    recipe_main(RECIPE)
