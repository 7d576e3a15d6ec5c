"""Where label-scoring evaluation spends its time (issue 15, goal 4), on the recipe's own model and test split.

Runs the pipeline's own stages up to the loaded model (data, preparation, load with the recipe's defaults), then:
1. `evaluate` over the whole test split, twice each: eager (torch.compile'd functions run as Python) first, then
   compiled (the first compiled pass includes tracing), at batch 32 and 64, with dynamo's graph counts per pass;
2. one pass at the default batch size split into its parts, each timed with the GPU synchronised: encoding on the
   CPU, the prompt forward (vision tower + language model), the vision tower alone, the class continuations
   (cached strategy), and the packed strategy's one forward (evaluate/packed.py) where the family allows it;
3. a torch.profiler table of one batch with the default strategy (the ops that take the GPU's time).

Usage (CUDA machine with unsloth; on a CPU it runs the hf backend, for checking the script itself):
    python benchmarks/eval_profile.py OUT_DIR --data_dir DATA --model MODEL [recipe flags]
Writes OUT_DIR/eval_profile.json and OUT_DIR/eval_profile_ops.txt, and prints a table.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _timed(fn):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def load_recipe_model(out_dir: Path, recipe_args: list[str], recipe):
    """The evaluation benchmarks' start: OUT_DIR made, the recipe's flags parsed before unsloth is imported
    (unsloth's SFTConfig adds its own --max_seq_length, as the CLI meets it), unsloth imported where a GPU is (on a
    CPU the hf backend runs, for checking a script itself), then the pipeline's stages up to the loaded model
    (load_for_evaluation). Returns (the config, the run context, the model on the inference path)."""
    import torch

    from unsloth_med.config import parse_config

    out_dir.mkdir(parents=True, exist_ok=True)
    config = parse_config(list(recipe_args) + ["--output_dir", str(out_dir / "run")], recipe)
    if torch.cuda.is_available():
        from unsloth_med.backends.unsloth import import_unsloth

        import_unsloth()
    from unsloth_med import pipeline

    return (config, *load_for_evaluation(pipeline, recipe, config))


def load_for_evaluation(pipeline, recipe, config):
    """The pipeline's own stages up to the loaded model (data, preparation, load with the recipe's defaults), the
    model put on the backend's inference path: (the run context, the model)."""
    ctx = pipeline.RunContext(recipe, config)
    for name, stage in (("setup", pipeline.setup), *pipeline.STAGES[:3]):
        pipeline._run_stage(ctx, name, stage)
    model = ctx.backend.for_inference(ctx.model)
    model.eval()
    return ctx, model


def with_trained_adapters(ctx, model, config):
    """`model` with LoRA adapters added as the recipe adds them, B made non-zero as training leaves it, on the
    backend's inference path: what a run's pass after training scores."""
    import torch

    tuned = ctx.backend.add_adapters(model, config.lora, config.model, seed=0)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    return ctx.backend.for_inference(tuned)


def main(argv: list[str]) -> int:
    out_dir, recipe_args = Path(argv[0]), argv[1:]
    import torch

    from unsloth_med.recipes.bone_fracture import RECIPE

    config, ctx, model = load_recipe_model(out_dir, recipe_args, RECIPE)
    from unsloth_med.evaluate import evaluate, shape_order
    from unsloth_med.evaluate.classify import dataset_labels, label_token_ids, score_encoded
    from unsloth_med.evaluate.inputs import batches, encode_rows, model_device_dtype, to_model
    from unsloth_med.evaluate.packed import can_pack, score_packed
    from unsloth_med.models.families import family_of

    test = ctx.test_set
    cuda = torch.cuda.is_available()
    record: dict = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "images": len(test),
                    "stages_s": dict(ctx.timings), "passes": []}
    print(f"{record['gpu']}: {len(test)} test images; stages {ctx.timings}")

    from torch._dynamo.utils import counters

    def compiled_so_far() -> dict:
        return {"unique_graphs": counters["stats"]["unique_graphs"], "frames_ok": counters["frames"]["ok"],
                "frames_total": counters["frames"]["total"]}

    # Eager first (nothing traced yet in this process), then compiled: a first pass's cost with and without tracing.
    for eager, batch_size in (((True, 32), (False, 32), (False, 64)) if cuda else ((True, 8), (False, 8))):
        for attempt in (1, 2):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            before = compiled_so_far()
            result = evaluate(model, ctx.processor, RECIPE, test, batch_size=batch_size, image_size=ctx.fit,
                              progress=False, eager=eager)
            after = compiled_so_far()
            row = {"batch_size": batch_size, "eager": eager, "attempt": attempt, **result["timing"],
                   "accuracy": result["metrics"]["accuracy"], "input_pipeline": result.get("input_pipeline"),
                   "dynamo": {k: after[k] - before[k] for k in after},
                   "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
            record["passes"].append(row)
            print(row)

    # One pass at batch 32, part by part.
    family = family_of(model.config)
    labels = dataset_labels(RECIPE, test)
    ids = label_token_ids(ctx.processor, family, labels)
    order = shape_order(test)
    rows_in_order = test.select(order) if order is not None else test
    device, dtype = model_device_dtype(model)
    # Twice: the first pass traces the paths `evaluate` did not take (the prompt alone with logits_to_keep=1);
    # the second, timed one, runs what is already traced.
    for _ in range(2):
        parts = {"encode_cpu_s": 0.0, "to_gpu_s": 0.0, "prompt_forward_s": 0.0, "vision_tower_s": 0.0,
                 "score_total_s": 0.0, "packed_total_s": 0.0, "tokens": 0, "batches": 0}
        packable = can_pack(model, family)
        tower = getattr(getattr(model, "model", model), "get_image_features", None)
        with torch.inference_mode():
            for rows in batches(rows_in_order, 32):
                start = time.perf_counter()
                encoded = encode_rows(ctx.processor, RECIPE, rows, ctx.fit)
                parts["encode_cpu_s"] += time.perf_counter() - start
                batch, seconds = _timed(lambda: to_model(encoded, device, dtype))
                parts["to_gpu_s"] += seconds
                parts["tokens"] += int(batch["attention_mask"].sum())
                parts["batches"] += 1
                _, seconds = _timed(lambda: model(**batch, use_cache=True, logits_to_keep=1))
                parts["prompt_forward_s"] += seconds
                if tower is not None and "pixel_values" in batch:
                    try:
                        _, seconds = _timed(lambda: tower(pixel_values=batch["pixel_values"],
                                                          image_sizes=batch.get("image_sizes")))
                        parts["vision_tower_s"] += seconds
                    except Exception as exc:  # noqa: BLE001 - a profile, not a product path
                        parts["vision_tower_error"] = str(exc)[:200]
                _, seconds = _timed(lambda: score_encoded(model, ctx.processor, family, encoded, ids))
                parts["score_total_s"] += seconds
                if packable:  # the default strategy where it applies: prompt and continuations in one forward
                    _, seconds = _timed(lambda: score_packed(model, ctx.processor, family, encoded, ids))
                    parts["packed_total_s"] += seconds
    parts["continuations_s"] = parts["score_total_s"] - parts["prompt_forward_s"]
    parts = {k: round(v, 3) if isinstance(v, float) else v for k, v in parts.items()}
    record["parts_batch32"] = parts
    print("parts at batch 32:", parts, "| label_scoring of the last pass:",
          record["passes"][-1]["input_pipeline"].get("label_scoring"))

    from torch.profiler import ProfilerActivity, profile

    first = next(iter(batches(rows_in_order, 32)))
    encoded = encode_rows(ctx.processor, RECIPE, first, ctx.fit)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    score = score_packed if packable else score_encoded  # the default strategy's ops
    with torch.inference_mode(), profile(activities=activities) as prof:
        score(model, ctx.processor, family, encoded, ids)
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40)
    (out_dir / "eval_profile_ops.txt").write_text(table)
    print(table[:6000])
    (out_dir / "eval_profile.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
