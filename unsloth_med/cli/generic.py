"""`python -m unsloth_med.recipes.generic classify|caption [options]`: the whole job on a generic recipe.

Lives here, not in recipes/generic.py: a recipe module never imports the CLI, config parser or pipeline."""
from __future__ import annotations

import sys

from .base import basic_logging, friendly

GENERIC_USAGE = """usage: python -m unsloth_med.recipes.generic {classify,caption} --data_dir DATA [options]

  classify: DATA is a CSV/JSONL listing (path,label[,split]), or a folder of class folders.
  caption:  DATA is a CSV/JSONL listing (image,text) or a Hugging Face dataset (name or save_to_disk folder).
Every option of `unsloth-med train --help` works here too."""


def generic_main(argv: list[str] | None = None) -> int:
    from ..recipes.generic import TASK_ALIASES, placeholder, record_resolved, resolve_recipe

    basic_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    asked_help = bool(argv) and argv[0] in ("-h", "--help")
    kind = TASK_ALIASES.get(argv[0].strip().lower()) if argv else None
    if asked_help or kind is None:
        print(GENERIC_USAGE if asked_help else f"error: expected classify or caption first.\n{GENERIC_USAGE}",
              file=sys.stdout if asked_help else sys.stderr)
        return 0 if asked_help else 2

    def job() -> int:
        from ..config import parse_config
        from ..secrets import remember_command_line_secrets, take_hub_token

        remember_command_line_secrets(argv)  # redacted from every message and log line from here on
        base = placeholder(kind)
        config = parse_config(argv[1:], base, prog=f"python -m unsloth_med.recipes.generic {kind}")
        take_hub_token(config.training)  # --hub_token: kept for the push, out of every file the trainer writes
        recipe = resolve_recipe(base, config)
        record_resolved(config, recipe)
        from ..pipeline import run

        run(recipe, config)
        return 0

    return friendly(job)
