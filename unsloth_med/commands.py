"""The subcommands besides `train`: argument parsing only; the work is in the modules they call."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def evaluate_command(argv: list[str]) -> int:
    from .evaluate.report import format_table
    from .predict import evaluate_saved_model

    parser = argparse.ArgumentParser(prog="unsloth-med evaluate", description="Evaluate a run folder or a model "
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

    parser = argparse.ArgumentParser(prog="unsloth-med predict", description="The model's answer for each image.")
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
    from .data.checks import check_data

    parser = argparse.ArgumentParser(prog="unsloth-med check-data", description="Validate a recipe's dataset: "
                                     "decode every image, count classes, find test images leaked from train "
                                     "(a training run drops them with --drop_leaked_test_images).")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--data_dir", "--data-dir")
    parser.add_argument("--json", help="write the summary as JSON to this file")
    args = parser.parse_args(argv)
    summary = check_data(args.recipe, args.data_dir)
    print(json.dumps({k: v for k, v in summary.items() if k != "leaked_test_images"}, indent=1))
    print(f"leaked test images: {len(summary.get('leaked_test_images', []))}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def export_command(argv: list[str]) -> int:
    from .export import export_command as run

    return run(argv)


def push_command(argv: list[str]) -> int:
    from .hub import push_command as run

    return run(argv)


def bench_command(argv: list[str]) -> int:
    from .bench import bench_command as run

    return run(argv)
