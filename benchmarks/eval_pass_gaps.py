"""Where a whole label-scoring pass's time goes between its batches (issue 15, goal 4), on the recipe's model.

Seven evaluate() passes of the base model over the test split at batch 32, in one process: a first (warm-up), the
default, the look-ahead encoding thread off (ahead=0) and deeper (ahead=2), then with the packed forward timed on its
own (GPU synchronised around it; with and without the look-ahead thread), and the default again. A batch's seconds
equal to its synchronised forward mean the pass is the forward; a faster forward without the thread means the
encoding thread competes with the launching thread.

Usage (CUDA machine with unsloth):
    python benchmarks/eval_pass_gaps.py OUT_DIR --data_dir DATA --model MODEL [recipe flags]
Writes OUT_DIR/eval_gaps.json.
"""
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    import torch
    from eval_profile import _timed, load_recipe_model  # benchmarks/, beside this script

    from unsloth_med.recipes.bone_fracture import RECIPE

    config, ctx, model = load_recipe_model(out_dir, argv[1:], RECIPE)
    import unsloth_med.evaluate.classify as classify
    from unsloth_med.evaluate import evaluate

    record: dict = {"gpu": torch.cuda.get_device_name()}
    score, depth_of = classify.score_packed, classify.prefetch_depth
    forward_seconds: list[float] = []

    def synchronised(*args, **kwargs):
        out, seconds = _timed(lambda: score(*args, **kwargs))
        forward_seconds.append(round(seconds, 3))
        return out

    def run(name, depth=None, sync=False):
        classify.prefetch_depth = (lambda model: depth) if depth is not None else depth_of
        classify.score_packed = synchronised if sync else score
        forward_seconds.clear()
        result = evaluate(model, ctx.processor, RECIPE, ctx.test_set, batch_size=32, image_size=ctx.fit,
                          progress=False, eager=True)
        feed = result["input_pipeline"]
        record[name] = {"seconds": result["timing"]["seconds"], "batch_seconds": feed.get("batch_seconds"),
                        "waited_s": feed.get("waited_s"), "prepare_s": feed.get("prepare_s"),
                        "check_s": feed["label_scoring"].get("check_seconds"), "score_packed_s": list(forward_seconds)}
        print(name, record[name], flush=True)

    for name, depth, sync in (("warm", None, False), ("default", None, False), ("ahead0", 0, False),
                              ("ahead2", 2, False), ("synced", None, True), ("synced_ahead0", 0, True),
                              ("default_again", None, False)):
        run(name, depth, sync)
    (out_dir / "eval_gaps.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
