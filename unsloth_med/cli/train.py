"""`unsloth-med train` and `python -m unsloth_med.recipes.<name>`: the whole job on a recipe."""
from __future__ import annotations

import sys

from .base import basic_logging, friendly, seconds_since_process_start


def train_command(argv: list[str], recipe=None, *, prog: str = "unsloth-med train", whole_process: bool = False,
                  resolve=None) -> int:
    """`whole_process`: the job is this process's command, so its time breakdown starts at the process's start.
    `resolve(recipe, config)`: the recipe to run, from the parsed config (the generic recipes build theirs)."""
    from ..config import parse_config
    from ..secrets import remember_command_line_secrets, take_hub_token

    remember_command_line_secrets(argv)  # redacted from every message and log line from here on
    if not {"-h", "--help", "--help-all"} & set(argv):
        from ..options import check_known_options

        check_known_options(argv)  # a typo fails at once, before torch, and before the seconds unsloth's import takes
        from ..backends.unsloth import import_unsloth_first

        # Unsloth patches transformers, TRL and PEFT when imported: before the parser imports them, so the run
        # gets all of its optimizations (and no "imported after" warning). Nothing happens without a GPU.
        import_unsloth_first(argv)
    config = parse_config(argv, recipe, prog=prog)  # before the pipeline's imports: typos fail at once
    take_hub_token(config.training)  # --hub_token: kept for the push, out of every file the trainer writes
    from ..pipeline import run
    from ..recipes import get_recipe

    if whole_process:  # the imports are done and nothing of the job exists yet (collector.py says why)
        from ..collector import freeze_imports

        freeze_imports()
    recipe = resolve(recipe, config) if resolve is not None else (recipe or get_recipe(config.run.recipe))
    run(recipe, config, startup_s=seconds_since_process_start() if whole_process else None)
    return 0


def recipe_main(recipe, argv: list[str] | None = None) -> None:
    """Entry point of `python -m unsloth_med.recipes.<name>` (the recipe's one-line `__main__`)."""
    basic_logging()
    whole_process = argv is None  # the process's own command (cli.main says why)
    argv = sys.argv[1:] if argv is None else argv
    prog = f"python -m unsloth_med.recipes.{recipe.name}"
    sys.exit(friendly(lambda: train_command(argv, recipe, prog=prog, whole_process=whole_process)))
