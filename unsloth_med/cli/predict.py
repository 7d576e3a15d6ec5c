"""`unsloth-med predict`: the model's answer for each image."""
from __future__ import annotations

import sys

from ..errors import ConfigError
from .base import ArgumentParser


def generation_budget(text: str) -> int:
    """--max_new_tokens: a whole number above 0 (0 or less stopped with transformers' traceback, after the model
    had loaded)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of tokens above 0, not {text!r}")
    return value


def predict_command(argv: list[str]) -> int:
    from ..predict import format_predictions, predict

    parser = ArgumentParser(prog="unsloth-med predict", description="The model's answer for each image.")
    parser.add_argument("--model", required=True, help="run folder or merged model folder")
    parser.add_argument("images", nargs="+", help="image files, or folders of them")
    parser.add_argument("--top_k", "--top-k", type=int, default=3)
    parser.add_argument("--question", help="VQA recipes: the question asked about each image")
    parser.add_argument("--recipe", help="the recipe, when the model folder does not record it")
    parser.add_argument("--together", action="store_true", help="one answer about all the images together")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=generation_budget,
                        help="captions and answers: generation budget (default: the run's, else the recipe's)")
    parser.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                        help="the value of another {column} the model's instruction names (e.g. --field modality=CT), "
                             "the same for every image; repeat for several")
    args = parser.parse_args(argv)
    fields = {}
    for item in args.field:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--field {item!r}: write NAME=VALUE, e.g. --field modality=CT.")
        fields[name.strip()] = value
    results = predict(args.model, args.images, top_k=args.top_k, question=args.question, together=args.together,
                      recipe=args.recipe, max_new_tokens=args.max_new_tokens, fields=fields)
    print(format_predictions(results))
    unread = [r["image"] for r in results if "error" in r]
    if unread:
        print(f"{len(unread)} of {len(results)} images could not be read: {', '.join(unread)}", file=sys.stderr)
    return 1 if unread else 0
