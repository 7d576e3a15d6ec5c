"""Generic recipes for your own data, configured without Python: `classify` and `caption`.

    # classification from a listing (path,label[,split]; paths relative to the listing's folder)
    unsloth-med train --recipe classify --data_dir data/labels.csv
    # ... or from class folders: <class>/*.png, <class>/{train,test}/*.png or {train,test}/<class>/*.png
    unsloth-med train --recipe classify --data_dir data/xrays --labels normal pneumonia
    # captioning from a listing with image,text columns, or a Hugging Face dataset
    unsloth-med train --recipe caption --data_dir reports.jsonl --image_column file --target_column report

(`python -m unsloth_med.recipes.generic classify|caption [options]` does the same.) The data section
of the config carries what a recipe module would otherwise hard-code:

    data:
      data_dir: data/labels.csv        # listing, class-folder root, HF dataset name or save_to_disk folder
      labels: [normal, pneumonia]      # classify: the classes, in order (default: every label in the data)
      instruction: "Classify this chest X-ray as one of: {labels}. Reply with the class name only."
      image_column: path               # default: path / image / file / imageurl ... whichever exists
      target_column: label             # default: label / class (classify), text / caption (caption)
      target_template: ""              # or a template over columns: "Findings: {findings} Impression: {impression}"
      split_column: split              # train/test (val/validation -> test when there is no test)
      test_fraction: 0.1               # held out, stratified by class, when the data has no split

`{labels}` in the instruction becomes the comma-separated class list.

This module holds what the two recipes are (their instructions and default model); recipes/resolve.py builds
them from the config's values (`build_generic_recipe`, `resolve_recipe`).
"""
import sys

GENERIC_KINDS = {"classify": "classification", "caption": "captioning"}
TASK_ALIASES = {"classify": "classify", "classification": "classify", "caption": "caption", "captioning": "caption"}

DEFAULT_MODEL = "unsloth/Ministral-3-3B-Instruct-2512"
DEFAULT_MODEL_4BIT = "unsloth/Ministral-3-3B-Instruct-2512-unsloth-bnb-4bit"

CLASSIFY_INSTRUCTION = (
    "Classify this image into exactly ONE of these classes: {labels}. Reply with ONLY the class name, exactly as "
    "written above: no explanations, no markdown, no punctuation."
)
CAPTION_INSTRUCTION = "Describe accurately what you see in this image."

if __name__ == "__main__":  # the command lives in cli/generic.py: a recipe never imports the CLI or the pipeline
    from ..cli import generic_main

    sys.exit(generic_main())
