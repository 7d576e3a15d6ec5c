"""Label scoring with each batch's scores read one batch late, against read at once, side by side (issue 15, goal 4).

The run's pass after training, as the pipeline makes it: the recipe's model with LoRA adapters (B non-zero, as
training leaves them) folded for the pass, eager, at batch 32, every batch read from the encoded batches an earlier
pass kept (`EncodedBatches`). After one warm pass, passes alternate between the default (session 20: the next
batch's forward is queued before a batch's scores are read, its inputs copied from page-locked memory) and the way
before it (scores read as soon as a batch is queued, inputs copied from pageable memory: the GPU idles while the CPU
builds a batch's predictions and copies in the next one).

Usage (CUDA machine with unsloth):
    python benchmarks/eval_read_ahead.py OUT_DIR --data_dir DATA --model MODEL --image_size 512 [recipe flags]
Writes OUT_DIR/eval_read_ahead.json.
"""
import json
import statistics
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    import torch
    from eval_profile import load_recipe_model, with_trained_adapters  # benchmarks/, beside this script

    from unsloth_med.recipes.bone_fracture import RECIPE

    config, ctx, model = load_recipe_model(out_dir, argv[1:], RECIPE)
    import unsloth_med.evaluate.classify as classify
    from unsloth_med.evaluate import EncodedBatches, evaluate

    tuned = with_trained_adapters(ctx, model, config)
    store = EncodedBatches()
    late_copy, late_pinned = classify.HostCopy, classify.pinned

    class ReadAtOnce(late_copy):  # waits for the batch's scores before the loop queues the next batch
        def __init__(self, tensor):
            super().__init__(tensor)
            self.result()

    record: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "passes": {}}

    def run(name: str, late: bool) -> None:
        classify.HostCopy = late_copy if late else ReadAtOnce
        classify.pinned = late_pinned if late else (lambda encoded: encoded)
        result = evaluate(tuned, ctx.processor, RECIPE, ctx.test_set, batch_size=32, image_size=ctx.fit,
                          progress=False, eager=True, inputs=store)
        feed = result["input_pipeline"]
        record["passes"][name] = {**result["timing"], "batch_seconds": feed.get("batch_seconds"),
                                  "prepare_s": feed.get("prepare_s"), "waited_s": feed.get("waited_s"),
                                  "folded_adapters": result.get("folded_adapters"),
                                  "encoded_batches": result.get("encoded_batches"),
                                  "accuracy": result["metrics"]["accuracy"]}
        print(name, record["passes"][name], flush=True)

    run("warm", True)
    for attempt in (1, 2, 3):
        run(f"read_at_once #{attempt}", False)
        run(f"read_late #{attempt}", True)
    for kind in ("read_at_once", "read_late"):
        rates = [p["examples_per_second"] for n, p in record["passes"].items() if n.startswith(kind)]
        record[kind] = {"images_per_second": rates, "median_images_per_second": statistics.median(rates)}
    print({k: record[k] for k in ("read_at_once", "read_late")}, flush=True)
    (out_dir / "eval_read_ahead.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
