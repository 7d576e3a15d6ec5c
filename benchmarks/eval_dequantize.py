"""Label scoring's images/s (issue 15, goal 4) with the 4-bit layers as loaded against the same layers dequantized
once for the pass (evaluate's `dequantize`), side by side in one process, on the recipe's own model and test split.

A 4-bit matmul of more than one row dequantizes its weight on every call; label scoring runs a batch of prompts
through every layer once, so a pass could spend as much on dequantizing as on the matmuls.
Passes over the whole test split at the pipeline's batch size, each `evaluate()` as a run calls it:
1. a warm-up pass (not compared);
2. the base model 4-bit, then dequantized, alternated twice (a drift in the machine shows between attempts);
3. LoRA adapters added as the recipe adds them (B non-zero, as after training): folded (the default after
   training), and folded with the other layers dequantized.

Usage (CUDA machine with unsloth; on a CPU it runs the hf backend, for checking the script itself):
    python benchmarks/eval_dequantize.py OUT_DIR --data_dir DATA --model MODEL [recipe flags]
Writes OUT_DIR/eval_dequantize.json and prints one line per pass.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    import torch
    from eval_profile import load_recipe_model, with_trained_adapters  # benchmarks/, beside this script

    from unsloth_med.recipes.bone_fracture import RECIPE

    config, ctx, model = load_recipe_model(out_dir, argv[1:], RECIPE)
    cuda = torch.cuda.is_available()
    from unsloth_med.evaluate import evaluate

    batch_size = ctx.eval_kw["batch_size"]
    record: dict = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "model": config.model.model,
                    "images": len(ctx.test_set), "batch_size": batch_size, "passes": []}

    def run(label, target, **kw):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = evaluate(target, ctx.processor, RECIPE, ctx.test_set, batch_size=batch_size, image_size=ctx.fit,
                          progress=False, eager=ctx.eval_kw["eager"], **kw)
        row = {"pass": label, "seconds": result["timing"]["seconds"],
               "images_per_second": result["timing"]["examples_per_second"],
               "accuracy": result["metrics"]["accuracy"], "folded_adapters": result.get("folded_adapters"),
               "check_s": (result["input_pipeline"].get("label_scoring") or {}).get("check_seconds"),
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        record["passes"].append(row)
        print(json.dumps(row), flush=True)

    run("warm-up", model)
    for attempt in (1, 2):
        run(f"4-bit #{attempt}", model)
        run(f"dequantized #{attempt}", model, dequantize=True)
    tuned = with_trained_adapters(ctx, model, config)
    run("LoRA folded", tuned)
    run("LoRA folded, rest dequantized", tuned, dequantize=True)
    (out_dir / "eval_dequantize.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
