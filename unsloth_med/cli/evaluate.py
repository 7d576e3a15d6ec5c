"""`unsloth-med evaluate`: a run folder or model on a recipe's test split, without training."""
from __future__ import annotations

import json

from .base import ArgumentParser, output_file


def evaluate_command(argv: list[str]) -> int:
    from ..evaluate.report import format_table
    from ..predict import evaluate_saved_model
    from .predict import generation_budget

    parser = ArgumentParser(prog="unsloth-med evaluate", description="Evaluate a run folder or a model "
                                     "on a recipe's test split, without training.")
    parser.add_argument("--model", required=True, help="run folder, merged model folder, hub id or tiny:<family>")
    parser.add_argument("--recipe", help="recipe name (default: the one recorded in the run/merged folder)")
    parser.add_argument("--data_dir", "--data-dir", help="local copy of the recipe's dataset")
    parser.add_argument("--mode", choices=["score", "generate"],
                        help="classification: label scoring or generation (default: the run's, else score)")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=generation_budget,
                        help="generation budget (default: the run's, else the recipe's)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--max_eval_samples", "--max-eval-samples", type=int)
    parser.add_argument("--output", help="write the metrics JSON here")
    args = parser.parse_args(argv)
    output = output_file(args.output, "--output")  # checked before the evaluation, not after it
    result = evaluate_saved_model(args.model, recipe_name=args.recipe, data_dir=args.data_dir, mode=args.mode,
                                  batch_size=args.batch_size, max_eval_samples=args.max_eval_samples,
                                  max_new_tokens=args.max_new_tokens)
    print(format_table(None, result))
    if output:
        output.write_text(json.dumps(result, indent=1))
    return 0
