"""`unsloth-med train` and `python -m unsloth_med.recipes.<name>`: the whole job on a recipe."""
from __future__ import annotations

import sys

from .base import basic_logging, friendly


def train_command(argv: list[str], recipe=None, *, prog: str = "unsloth-med train") -> int:
    from ..config import parse_config

    config = parse_config(argv, recipe, prog=prog)  # before the pipeline's imports: typos fail at once
    from ..pipeline import run
    from ..recipes import get_recipe

    run(recipe or get_recipe(config.run.recipe), config)
    return 0


def recipe_main(recipe, argv: list[str] | None = None) -> None:
    """Entry point of `python -m unsloth_med.recipes.<name>` (the recipe's one-line `__main__`)."""
    basic_logging()
    argv = sys.argv[1:] if argv is None else argv
    prog = f"python -m unsloth_med.recipes.{recipe.name}"
    sys.exit(friendly(lambda: train_command(argv, recipe, prog=prog)))
