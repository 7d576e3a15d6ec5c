"""Visual question answering on your own data: SLAKE, PathVQA, or any listing / HF dataset.

    # a listing with image, question, answer[, answer_type][, image_group][, split] columns
    python -m unsloth_med.recipes.vqa --data_dir slake.csv --split_by image
    # a Hugging Face dataset by name (or a save_to_disk folder)
    python -m unsloth_med.recipes.vqa --data_dir flaviagiammarino/path-vqa
    # conversations: a JSONL of LLaVA/ShareGPT `conversations` or OpenAI `messages`, several turns and images
    python -m unsloth_med.recipes.vqa --data_dir chats.jsonl

Other column names: --question_column, --answer_column, --answer_type_column, --image_group_column.
The instruction may name any column: --instruction "Modality: {modality}. {question}".
"""
from .base import Recipe, TableSource
from .generic import DEFAULT_MODEL, DEFAULT_MODEL_4BIT

INSTRUCTION = "Answer the question about the image in as few words as possible.\nQuestion: {question}"

RECIPE = Recipe(
    name="vqa",
    task="vqa",
    instruction=INSTRUCTION,
    source=TableSource(attribution="Your own data: state its source, license and credit here."),
    default_model=DEFAULT_MODEL,
    default_model_4bit=DEFAULT_MODEL_4BIT,
    image_size=512,
    max_new_tokens=32,
)

if __name__ == "__main__":
    from ..cli import recipe_main

    recipe_main(RECIPE)
