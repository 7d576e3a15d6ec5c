"""`unsloth-med <command>`: each command is a plain function; this module only parses and calls.

    unsloth-med train --recipe bone_fracture [--config FILE] [--quick] [options]   the whole job
    unsloth-med demo [--output_dir DIR]                                         offline demo
    unsloth-med evaluate --model RUN_OR_MODEL --recipe R [--data_dir D]          no training
    unsloth-med predict --model RUN_OR_MODEL IMAGE...                            one answer per image
    unsloth-med export RUN_DIR --format adapter|merged-16bit|gguf [--quant f16|q8_0|q4_k_m] [--out DIR]
    unsloth-med push DIR OWNER/NAME [--public]
    unsloth-med check-data --recipe R [--data_dir D] [train's data options] [--json FILE]
    unsloth-med bench ...

`python -m unsloth_med.recipes.<name> [options]` is `unsloth-med train --recipe <name> [options]`.
Expected problems (bad data, missing credentials, no GPU) print one clear message and exit 2.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

from .errors import UnslothMedError


def _friendly(fn: Callable[[], int | None]) -> int:
    try:
        return fn() or 0
    except UnslothMedError as exc:
        from .secrets import redact

        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run folder keeps its last checkpoint; continue with --resume", file=sys.stderr)
        return 130


def train_command(argv: list[str], recipe=None, *, prog: str = "unsloth-med train") -> int:
    from .config import parse_config

    config = parse_config(argv, recipe, prog=prog)  # before the pipeline's imports: typos fail at once
    from .pipeline import run
    from .recipes import get_recipe

    run(recipe or get_recipe(config.run.recipe), config)
    return 0


def recipe_main(recipe, argv: list[str] | None = None) -> None:
    """Entry point of `python -m unsloth_med.recipes.<name>` (the recipe's one-line `__main__`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    prog = f"python -m unsloth_med.recipes.{recipe.name}"
    sys.exit(_friendly(lambda: train_command(argv, recipe, prog=prog)))


GENERIC_USAGE = """usage: python -m unsloth_med.recipes.generic {classify,caption} --data_dir DATA [options]

  classify: DATA is a CSV/JSONL listing (path,label[,split]), or a folder of class folders.
  caption:  DATA is a CSV/JSONL listing (image,text) or a Hugging Face dataset (name or save_to_disk folder).
Every option of `unsloth-med train --help` works here too."""


def generic_main(argv: list[str] | None = None) -> int:
    """`python -m unsloth_med.recipes.generic classify|caption [options]`: the whole job on a generic recipe.

    Lives here, not in recipes/generic.py: a recipe module never imports the CLI, config parser or pipeline."""
    from .recipes.generic import TASK_ALIASES, placeholder, record_resolved, resolve_recipe

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    asked_help = bool(argv) and argv[0] in ("-h", "--help")
    kind = TASK_ALIASES.get(argv[0].strip().lower()) if argv else None
    if asked_help or kind is None:
        print(GENERIC_USAGE if asked_help else f"error: expected classify or caption first.\n{GENERIC_USAGE}",
              file=sys.stdout if asked_help else sys.stderr)
        return 0 if asked_help else 2

    def job() -> int:
        from .config import parse_config

        base = placeholder(kind)
        config = parse_config(argv[1:], base, prog=f"python -m unsloth_med.recipes.generic {kind}")
        recipe = resolve_recipe(base, config)
        record_resolved(config, recipe)
        from .pipeline import run

        run(recipe, config)
        return 0

    return _friendly(job)


def demo_command(argv: list[str]) -> int:
    from .recipes import get_recipe

    return train_command(["--demo", *argv], get_recipe("bone_fracture"), prog="unsloth-med demo")


COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:function taking argv, one-line help)
    "train": ("unsloth_med.cli:train_command", "run a recipe: data, eval before, train, eval after, export"),
    "demo": ("unsloth_med.cli:demo_command", "offline demo on a tiny model and generated X-rays (CPU, no network)"),
    "evaluate": ("unsloth_med.commands:evaluate_command", "evaluate a model or run folder on a recipe's test split"),
    "predict": ("unsloth_med.commands:predict_command", "answer for each image (class + probabilities, or caption)"),
    "export": ("unsloth_med.commands:export_command", "export a run: adapter, merged 16-bit weights or GGUF, verified"),
    "push": ("unsloth_med.commands:push_command", "push an exported folder to the Hugging Face Hub"),
    "check-data": ("unsloth_med.commands:check_data_command",
                   "validate a dataset, summarize it, find train/test leaks"),
    "bench": ("unsloth_med.commands:bench_command", "side-by-side speed/memory benchmark of the training paths"),
}


def _usage() -> str:
    lines = ["usage: unsloth-med <command> [options]   (each command has --help)", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'.\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    import importlib

    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    sys.exit(_friendly(lambda: func(rest)))


if __name__ == "__main__":
    main()
