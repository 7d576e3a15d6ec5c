"""Captioning's generated tokens/s (issue 15, goal 4) on the radiology_caption recipe's model, side by side.

The recipe's data (unsloth/Radiology_mini) cannot be fetched offline, so the bench captions the real bone-break
X-rays instead (a stand-in reference caption per class). With random weights the captions are noise and a row stops
only at max_new_tokens, so the figures are the decoder's rate at the recipe's generation length, not a dataset's.

Passes over the same test images, each `evaluate()` as a run calls it (the pipeline's batch size and compile
setting for captioning), generated tokens counted on the ids:
1. a warm-up pass on a few images (traces what generation compiles; not compared);
2. the base model with its 4-bit weights (`dequantize=False`: a run's pass before training with --eval_dequantize
   false), then the same with every 4-bit layer dequantized once for the pass (evaluate's `dequantize`, a run's
   default for generation since session 20), alternated twice;
3. both again at other batch sizes;
4. LoRA adapters added as the recipe adds them (B made non-zero, as after training): folded (the default after
   training) and unfolded.

Usage (CUDA machine with unsloth; on a CPU it runs the hf backend, for checking the script itself):
    python benchmarks/caption_generation.py OUT_DIR --bone_break DIR --model MODEL [--images N] [recipe flags]
Writes OUT_DIR/caption_generation.json and prints one line per pass.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def stand_in_captions(bone_break: str, dest: Path) -> Path:
    """The bone-break X-rays as a captioning dataset on disk ({image, caption}, train and test), as a user's local
    copy of unsloth/Radiology_mini would be."""
    import datasets

    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.recipes.bone_fracture import RECIPE as BONE

    if not (dest / "dataset_dict.json").is_file():
        splits = load_recipe_data(BONE, bone_break)
        captions = datasets.DatasetDict({
            name: split.map(lambda row: {"caption": f"Radiograph of a bone showing a {row['target'].lower()}."},
                            remove_columns=["target", "id"])
            for name, split in splits.items()})
        captions.save_to_disk(str(dest))
    return dest


def _pass(evaluate, model, ctx, recipe, rows, *, label: str, batch_size: int, **kw) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = evaluate(model, ctx.processor, recipe, rows, mode="generate", batch_size=batch_size,
                      max_new_tokens=ctx.eval_kw["max_new_tokens"], image_size=ctx.fit, progress=False,
                      eager=ctx.eval_kw["eager"], **kw)
    feed = result["input_pipeline"]
    row = {"pass": label, "images": len(rows), "batch_size": batch_size, "seconds": result["timing"]["seconds"],
           "generated_tokens": feed.get("generated_tokens"),
           "generated_tokens_per_second": feed.get("generated_tokens_per_second"),
           "images_per_second": result["timing"]["examples_per_second"], "waited_s": feed.get("waited_s"),
           "folded_adapters": result["folded_adapters"], "bleu": result["metrics"].get("bleu"),
           "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--bone_break", required=True, help="the bone-break dataset's folder")
    parser.add_argument("--images", type=int, default=64, help="test images captioned in each pass")
    args, recipe_args = parser.parse_known_args(argv)  # the rest: the radiology_caption recipe's own flags
    out_dir, bone_break, images = args.out_dir, args.bone_break, args.images
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch
    from eval_profile import load_recipe_model, with_trained_adapters

    from unsloth_med.recipes.radiology_caption import RECIPE

    data = stand_in_captions(bone_break, out_dir / "captions")
    config, ctx, model = load_recipe_model(out_dir, recipe_args + ["--data_dir", str(data)], RECIPE)
    cuda = torch.cuda.is_available()
    from unsloth_med.evaluate import evaluate

    rows = ctx.test_set.select(range(min(images, len(ctx.test_set))))
    default_batch = ctx.eval_kw["batch_size"]
    record: dict = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "model": config.model.model,
                    "images": len(rows), "max_new_tokens": ctx.eval_kw["max_new_tokens"] or RECIPE.max_new_tokens,
                    "eager": ctx.eval_kw["eager"], "default_batch_size": default_batch,
                    "stages_s": dict(ctx.timings), "passes": []}
    print(f"{record['gpu']}: {len(rows)} images, {record['max_new_tokens']} new tokens at most; stages {ctx.timings}")

    def run(label, target=model, **kw):
        record["passes"].append(_pass(evaluate, target, ctx, RECIPE, rows if label != "warm-up" else rows.select(
            range(min(4, len(rows)))), label=label, **kw))

    run("warm-up", batch_size=min(4, default_batch))
    for attempt in (1, 2):  # alternated: a drift in the machine shows as a difference between attempts
        run(f"4-bit #{attempt}", batch_size=default_batch, dequantize=False)  # generation dequantizes by default
        run(f"dequantized #{attempt}", batch_size=default_batch, dequantize=True)
    for batch_size in sorted({max(1, default_batch // 2), default_batch * 2} - {default_batch}):
        run("4-bit", batch_size=batch_size, dequantize=False)
        run("dequantized", batch_size=batch_size, dequantize=True)

    # After training: the recipe's adapters, B non-zero as training leaves it.
    tuned = with_trained_adapters(ctx, model, config)
    run("LoRA folded", target=tuned, batch_size=default_batch, dequantize=False)
    run("LoRA unfolded", target=tuned, batch_size=default_batch, fold_adapters=False, dequantize=False)
    run("LoRA folded, rest dequantized", target=tuned, batch_size=default_batch, dequantize=True)

    (out_dir / "caption_generation.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
