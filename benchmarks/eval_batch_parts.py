"""Where one packed label-scoring batch's time goes (issue 15, goal 4), on the recipe's model and test split.

After two evaluate() passes of the base model (no adapters), the batch of the largest images is timed part by part with
the GPU synchronised: packed and cached scoring, the prompt forward, the vision tower, packed scoring under each SDPA
backend; then bf16 GEMM rates at the batch's shapes (what the matmuls could reach), a torch.profiler table of the
packed batch, and packed scoring with every 4-bit weight dequantized once (what bitsandbytes' per-call
dequantization costs), with one more whole pass in that state.

Usage (CUDA machine with unsloth):
    python benchmarks/eval_batch_parts.py OUT_DIR --data_dir DATA --model MODEL [recipe flags]
Writes OUT_DIR/eval_batch_parts.json and OUT_DIR/packed_ops.txt.
"""
import json
import sys
from pathlib import Path


def timed(fn, n=3):
    """(fastest, median) seconds of `n` calls after one untimed call, each timed by eval_profile's `_timed` (the GPU
    synchronised around it)."""
    from eval_profile import _timed  # benchmarks/, beside this script

    fn()
    times = sorted(_timed(fn)[1] for _ in range(n))
    return round(times[0], 4), round(times[len(times) // 2], 4)


def main(argv: list[str]) -> int:
    out_dir, recipe_args = Path(argv[0]), argv[1:]
    import torch
    from eval_profile import load_recipe_model  # benchmarks/, beside this script

    from unsloth_med.recipes.bone_fracture import RECIPE

    config, ctx, model = load_recipe_model(out_dir, recipe_args, RECIPE)
    from unsloth_med.evaluate import evaluate, shape_order
    from unsloth_med.evaluate.classify import dataset_labels, label_token_ids, score_encoded
    from unsloth_med.evaluate.inputs import batches, encode_rows, model_device_dtype, to_model
    from unsloth_med.evaluate.packed import score_packed
    from unsloth_med.models.families import family_of

    rec: dict = {}
    test = ctx.test_set
    rec["gpu"] = torch.cuda.get_device_name()

    for attempt in (1, 2):
        r = evaluate(model, ctx.processor, RECIPE, test, batch_size=32, image_size=ctx.fit, progress=False, eager=True)
        rec[f"pass{attempt}"] = {**r["timing"], "batch_seconds": r["input_pipeline"].get("batch_seconds"),
                                "check": r["input_pipeline"].get("label_scoring")}
        print("pass", attempt, rec[f"pass{attempt}"], flush=True)

    family = family_of(model.config)
    ids = label_token_ids(ctx.processor, family, dataset_labels(RECIPE, test))
    order = shape_order(test)
    rows_sorted = test.select(order) if order is not None else test
    all_batches = list(batches(rows_sorted, 32))
    shapes = [sorted({r["image_shape"] for r in b}) for b in all_batches]
    print("batch shapes", shapes)
    area = lambda shape: int(shape.split("x")[0]) * int(shape.split("x")[1])  # noqa: E731
    big = max(range(len(all_batches)), key=lambda i: sum(area(s) for s in shapes[i]))  # the largest images' batch
    encoded = encode_rows(ctx.processor, RECIPE, all_batches[big], ctx.fit)
    tokens = int(encoded["input_ids"].shape[0] * encoded["input_ids"].shape[1])
    rec["big_batch"] = {"shapes": shapes[big], "rows": len(all_batches[big]), "prompt_tokens_padded": tokens,
                        "seq_len": int(encoded["input_ids"].shape[1])}
    with torch.inference_mode():
        rec["packed_s"] = timed(lambda: score_packed(model, ctx.processor, family, encoded, ids))
        rec["cached_s"] = timed(lambda: score_encoded(model, ctx.processor, family, encoded, ids))
        device, dtype = model_device_dtype(model)
        batch = to_model(encoded, device, dtype)
        rec["prompt_forward_s"] = timed(lambda: model(**batch, use_cache=False, logits_to_keep=1))
        tower = model.model.get_image_features if hasattr(model.model, "get_image_features") else None
        try:
            rec["vision_s"] = timed(lambda: tower(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]))
        except Exception as exc:  # noqa: BLE001
            rec["vision_s"] = str(exc)[:200]
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, backend in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("math", SDPBackend.MATH)):
            try:
                with sdpa_kernel([backend]):
                    rec[f"packed_sdpa_{name}_s"] = timed(
                        lambda: score_packed(model, ctx.processor, family, encoded, ids), n=2)
            except Exception as exc:  # noqa: BLE001
                rec[f"packed_sdpa_{name}_s"] = str(exc)[:200]
        print({k: v for k, v in rec.items() if k.endswith("_s")}, flush=True)

        # achievable GEMM rate at these shapes
        m = rec["big_batch"]["prompt_tokens_padded"] + 36 * 32
        gemm = {}
        for n_out, k_in in ((4096, 5120), (1024, 5120), (16384, 5120), (5120, 16384), (5120, 4096)):
            a = torch.randn(m, k_in, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16)
            best, _ = timed(lambda: torch.nn.functional.linear(a, w), n=10)
            gemm[f"{m}x{k_in}->{n_out}"] = round(2 * m * k_in * n_out / best / 1e12, 1)
        rec["gemm_tflops"] = gemm
        print("gemm TFLOP/s", gemm, flush=True)

        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            score_packed(model, ctx.processor, family, encoded, ids)
        torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45)
        (out_dir / "packed_ops.txt").write_text(table)
        print(table[:9000])

        # the weights dequantized once: what bnb's per-forward dequantization costs
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
        n = 0
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                w = bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(torch.bfloat16)
                mod.forward = (lambda W, b: (lambda x, *a, **k: torch.nn.functional.linear(x, W, b)))(w, mod.bias)
                n += 1
        torch.cuda.synchronize()
        rec["dequantized_modules"] = n
        rec["packed_dequantized_s"] = timed(lambda: score_packed(model, ctx.processor, family, encoded, ids))
        rec["memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        print("dequantized once:", n, rec["packed_dequantized_s"], flush=True)
        r = evaluate(model, ctx.processor, RECIPE, test, batch_size=32, image_size=ctx.fit, progress=False, eager=True)
        rec["pass_dequantized"] = {**r["timing"], "batch_seconds": r["input_pipeline"].get("batch_seconds")}
        print("pass dequantized", rec["pass_dequantized"], flush=True)
    (out_dir / "eval_batch_parts.json").write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
