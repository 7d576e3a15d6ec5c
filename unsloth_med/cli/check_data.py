"""`unsloth-med check-data`: validate a recipe's dataset as a training run would load it, without a model."""
from __future__ import annotations

import json

from ..errors import ConfigError
from ..options import option_line, section_lines
from .base import output_file


def check_data_command(argv: list[str]) -> int:
    from ..config import parse_config
    from ..data.checks import check_data
    from ..recipes import get_recipe
    from ..recipes.resolve import resolve_recipe

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
    json_file = output_file(json_path, "--json")  # checked before the data checks, not after them
    recipe = resolve_recipe(get_recipe(config.run.recipe), config)
    summary = check_data(recipe, config.data.data_dir, image_size=config.data.image_size, seed=config.training.seed,
                         split_by=config.data.split_by, test_fraction=config.data.test_fraction)
    print(format_check(summary, data_dir=config.data.data_dir, json_path=json_path))
    if json_file:
        json_file.write_text(json.dumps(summary, indent=1))
    return 0


def format_check(summary: dict, *, data_dir: str | None = None, json_path: str | None = None, shown: int = 5) -> str:
    """check-data's summary for a person: sizes, classes per split, unusable images, the first leaked pairs."""
    from ..data.checks import leak_message

    sizes = summary.get("sizes", {})
    vqa = summary.get("task") == "vqa"  # rows are questions (several per image), not images
    lines = [f"check-data: recipe {summary.get('recipe')}, data {data_dir or '(the recipe default)'}, "
             f"images sized to {summary.get('image_size')} px",
             "  " + ", ".join(f"{name}: {n} {'examples' if vqa else 'images'}" for name, n in sizes.items())]
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
        # Two answers about one image differ by design (other questions): only a class filed twice is worth a note.
        labels = (f"  [labels differ: {leak.get('test_label')} / {leak.get('train_label')}]"
                  if not vqa and leak.get("test_label") != leak.get("train_label") else "")
        lines.append(f"  test {_named(leak, 'test')}  =  train {_named(leak, 'train')}{labels}")
    if len(leaks) > shown:
        lines.append(f"  ... and {len(leaks) - shown} more")
    if leaks and summary.get("leak_counts"):
        lines.append(f"  {leak_message(summary['leak_counts'])}")
    if leaks:
        lines.append("hint: remove them from the test split, or train with --drop_leaked_test_images to evaluate "
                     "without them.")
    return "\n".join(lines)


def _named(leak: dict, side: str) -> str:
    """A leaked image by its path, or by its row's id when it has none (an image held in a dataset: 'test[3]')."""
    name = str(leak.get(side))
    return str(leak.get(f"{side}_id") or name) if name.startswith(f"{side}[") else name


def check_data_help(width: int = 120) -> str:
    from ..config import DataArgs

    return "\n".join([
        "usage: unsloth-med check-data --recipe NAME [--config FILE] [--json FILE] [data options]", "",
        "Validate a recipe's dataset as a training run would load it: decode every image, count classes, find test",
        "images that are near-copies of training images. Takes train's data options and --config.", "",
        option_line("recipe", "NAME", "Recipe name or importable module path.", width),
        option_line("config", "FILE", "A config YAML (its data section applies, as in train).", width),
        option_line("json", "FILE", "Write the whole summary, every leaked pair and skipped image, as JSON.", width),
        "", "data:", *section_lines(DataArgs, width)])
