"""The subcommands besides `train`: argument parsing only; the work is in the modules they call."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigError: printed as one `error: ...` line like every other error."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def evaluate_command(argv: list[str]) -> int:
    from .evaluate.report import format_table
    from .predict import evaluate_saved_model

    parser = ArgumentParser(prog="unsloth-med evaluate", description="Evaluate a run folder or a model "
                                     "on a recipe's test split, without training.")
    parser.add_argument("--model", required=True, help="run folder, merged model folder, hub id or tiny:<family>")
    parser.add_argument("--recipe", help="recipe name (default: the one recorded in the run/merged folder)")
    parser.add_argument("--data_dir", "--data-dir", help="local copy of the recipe's dataset")
    parser.add_argument("--mode", choices=["score", "generate"], default="score")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--max_eval_samples", "--max-eval-samples", type=int)
    parser.add_argument("--output", help="write the metrics JSON here")
    args = parser.parse_args(argv)
    result = evaluate_saved_model(args.model, recipe_name=args.recipe, data_dir=args.data_dir, mode=args.mode,
                                  batch_size=args.batch_size, max_eval_samples=args.max_eval_samples)
    print(format_table(None, result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


def predict_command(argv: list[str]) -> int:
    from .predict import format_predictions, predict

    parser = ArgumentParser(prog="unsloth-med predict", description="The model's answer for each image.")
    parser.add_argument("--model", required=True, help="run folder or merged model folder")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--top_k", "--top-k", type=int, default=3)
    parser.add_argument("--question", help="VQA recipes: the question asked about each image")
    parser.add_argument("--recipe", help="the recipe, when the model folder does not record it")
    parser.add_argument("--together", action="store_true", help="one answer about all the images together")
    args = parser.parse_args(argv)
    results = predict(args.model, args.images, top_k=args.top_k, question=args.question, together=args.together,
                      recipe=args.recipe)
    print(format_predictions(results))
    unread = [r["image"] for r in results if "error" in r]
    if unread:
        print(f"{len(unread)} of {len(args.images)} images could not be read: {', '.join(unread)}", file=sys.stderr)
    return 1 if unread else 0


def check_data_command(argv: list[str]) -> int:
    from .config import parse_config
    from .data.checks import check_data
    from .options import check_data_help
    from .recipes import get_recipe
    from .recipes.generic import resolve_recipe

    if "-h" in argv or "--help" in argv:
        print(check_data_help())
        return 0
    argv = list(argv)
    json_path = None
    if "--json" in argv:  # check-data's own option; the rest is train's config
        at = argv.index("--json")
        if at + 1 >= len(argv):
            raise ConfigError("--json needs a file name: --json summary.json")
        json_path = argv.pop(at + 1)
        argv.pop(at)
    config = parse_config(argv, prog="unsloth-med check-data")
    recipe = resolve_recipe(get_recipe(config.run.recipe), config)
    summary = check_data(recipe, config.data.data_dir, image_size=config.data.image_size)
    print(format_check(summary, data_dir=config.data.data_dir, json_path=json_path))
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1))
    return 0


def format_check(summary: dict, *, data_dir: str | None = None, json_path: str | None = None, shown: int = 5) -> str:
    """check-data's summary for a person: sizes, classes per split, unusable images, the first leaked pairs."""
    sizes = summary.get("sizes", {})
    lines = [f"check-data: recipe {summary.get('recipe')}, data {data_dir or '(the recipe default)'}, "
             f"images sized to {summary.get('image_size')} px",
             "  " + ", ".join(f"{name}: {n} images" for name, n in sizes.items())]
    counts = summary.get("class_counts")
    if counts:
        names = list(counts)
        classes = sorted({c for per in counts.values() for c in per})
        width = max(len(c) for c in classes) + 2
        lines.append(f"  {'class':<{width}}" + "".join(f"{n:>8}" for n in names))
        lines += [f"  {c:<{width}}" + "".join(f"{counts[n].get(c, 0):>8}" for n in names) for c in classes]
    more = f" (all in {json_path})" if json_path else " (--json FILE lists all)"
    skipped = summary.get("skipped_images", [])
    lines.append(f"unusable images: {len(skipped)}" + (more if len(skipped) > shown else ""))
    lines += [f"  {s.get('split')}: {s.get('image')}: {s.get('reason')}" for s in skipped[:shown]]
    leaks = summary.get("leaked_test_images", [])
    lines.append(f"leaked test images: {len(leaks)}" + (" (near-identical copies of training images)" if leaks else "")
                 + (more if len(leaks) > shown else ""))
    for leak in leaks[:shown]:
        labels = (f"  [labels differ: {leak.get('test_label')} / {leak.get('train_label')}]"
                  if leak.get("test_label") != leak.get("train_label") else "")
        lines.append(f"  test {leak.get('test')}  =  train {leak.get('train')}{labels}")
    if len(leaks) > shown:
        lines.append(f"  ... and {len(leaks) - shown} more")
    if leaks:
        lines.append("hint: remove them from the test split, or train with --drop_leaked_test_images to evaluate "
                     "without them.")
    return "\n".join(lines)


def export_command(argv: list[str]) -> int:
    from .export import export_command as run

    return run(argv)


def push_command(argv: list[str]) -> int:
    from .hub import push_command as run

    return run(argv)


def bench_command(argv: list[str]) -> int:
    from .bench import bench_command as run

    return run(argv)
