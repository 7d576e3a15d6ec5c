"""`unsloth-med <command>`: one module per command under unsloth_med/cli/; this one only dispatches.

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
A command's module is imported only when that command runs, so `unsloth-med <typo>` and `--help` stay fast.
"""
from __future__ import annotations

import importlib
import sys

from .base import basic_logging, friendly
from .generic import generic_main
from .train import recipe_main, train_command

__all__ = ["COMMANDS", "generic_main", "main", "recipe_main", "train_command"]

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:function taking argv, one-line help)
    "train": ("unsloth_med.cli.train:train_command", "run a recipe: data, eval before, train, eval after, export"),
    "demo": ("unsloth_med.cli.demo:demo_command",
             "offline demo on a tiny model and generated X-rays (CPU, no network)"),
    "evaluate": ("unsloth_med.cli.evaluate:evaluate_command",
                 "evaluate a model or run folder on a recipe's test split"),
    "predict": ("unsloth_med.cli.predict:predict_command",
                "answer for each image (class + probabilities, or caption)"),
    "export": ("unsloth_med.cli.export:export_command",
               "export a run: adapter, merged 16-bit weights or GGUF, verified"),
    "push": ("unsloth_med.cli.push:push_command", "push an exported folder to the Hugging Face Hub"),
    "check-data": ("unsloth_med.cli.check_data:check_data_command",
                   "validate a dataset, summarize it, find train/test leaks"),
    "bench": ("unsloth_med.cli.bench:bench_command", "side-by-side speed/memory benchmark of the training paths"),
}


def _usage() -> str:
    lines = ["usage: unsloth-med <command> [options]   (each command has --help)", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    basic_logging()
    # The process's own command (argv from sys.argv) owns the process: its time breakdown starts with the process
    # and it freezes its imports (collector.py). Called with an argv, from a script or a test, it owns neither.
    whole_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'.\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    extra = {"whole_process": whole_process} if name == "train" else {}
    sys.exit(friendly(lambda: func(rest, **extra)))
