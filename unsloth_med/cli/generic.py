"""`python -m unsloth_med.recipes.generic classify|caption [options]`: the whole job on a generic recipe.

Lives here, not in recipes/generic.py: a recipe module never imports the CLI, config parser or pipeline."""
from __future__ import annotations

import sys

from .base import basic_logging, friendly
from .train import train_command

GENERIC_USAGE = """usage: python -m unsloth_med.recipes.generic {classify,caption} --data_dir DATA [options]

  classify: DATA is a CSV/JSONL listing (path,label[,split]), or a folder of class folders.
  caption:  DATA is a CSV/JSONL listing (image,text) or a Hugging Face dataset (name or save_to_disk folder).
Every option of `unsloth-med train --help` works here too."""


def generic_main(argv: list[str] | None = None) -> int:
    from ..recipes.generic import TASK_ALIASES
    from ..recipes.resolve import placeholder, record_resolved, resolve_recipe

    basic_logging()
    whole_process = argv is None  # the process's own command (cli.main says why)
    argv = list(sys.argv[1:] if argv is None else argv)
    asked_help = bool(argv) and argv[0] in ("-h", "--help")
    kind = TASK_ALIASES.get(argv[0].strip().lower()) if argv else None
    if asked_help or kind is None:
        print(GENERIC_USAGE if asked_help else f"error: expected classify or caption first.\n{GENERIC_USAGE}",
              file=sys.stdout if asked_help else sys.stderr)
        return 0 if asked_help else 2

    def resolve(base, config):
        recipe = resolve_recipe(base, config)
        record_resolved(config, recipe)
        return recipe

    # As any training command: unsloth imported first on a GPU, the imports frozen, the time from process start.
    return friendly(lambda: train_command(argv[1:], placeholder(kind), whole_process=whole_process, resolve=resolve,
                                          prog=f"python -m unsloth_med.recipes.generic {kind}"))
