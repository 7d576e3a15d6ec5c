"""The offline demo from Python instead of the shell: tiny Ministral-3-family model, generated X-rays.

    python examples/offline_demo.py runs/demo-from-python
"""
import sys

from unsloth_med.config import parse_config
from unsloth_med.pipeline import run
from unsloth_med.recipes import get_recipe

recipe = get_recipe("bone_fracture")
config = parse_config(["--demo", "--output_dir", sys.argv[1] if len(sys.argv) > 1 else "runs/demo-from-python"], recipe)
metrics = run(recipe, config)
if metrics:  # under torchrun only rank 0 reports; the other ranks get {}
    print("accuracy before -> after:", metrics["before"]["accuracy"], "->", metrics["after"]["accuracy"])
