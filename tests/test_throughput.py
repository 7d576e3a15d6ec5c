"""Throughput plumbing on the CPU: image buckets, the preprocessing cache, length grouping, step stats, the bench.

The speed itself is measured on the GPU by `unsloth-med bench` and the recipe runs (benchmarks/README.md);
these tests check that the machinery feeds the model the same pixels, caches what it says it caches, and
reports what it measured.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from unsloth_med.data.images import ImageFit, load_image
from unsloth_med.data.prepare import prepare_images, prepared_path, sample_length
from unsloth_med.data.sources import load_recipe_data
from unsloth_med.recipes.bone_fracture import RECIPE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bone_train(bone_break_dir):
    return load_recipe_data(RECIPE, str(bone_break_dir))["train"]


def test_buckets_give_few_fixed_shapes_on_the_real_xrays(bone_train):
    fit = ImageFit(512, 28, buckets=True)
    boxes = set(fit.bucket_boxes())
    assert (504, 504) in boxes and all(w % 28 == 0 and h % 28 == 0 and max(w, h) == 504 for w, h in boxes)
    sources = bone_train.shuffle(seed=0).select(range(120))
    shapes = set()
    for row in sources:
        original = load_image(row["image"])
        fitted = fit(original)
        shapes.add(fitted.size)
        assert fitted.size in boxes
        assert fit(fitted) is fitted  # idempotent: a prepared image passes through untouched
        # The image is scaled (aspect kept) into the box and centred; the rest is black padding.
        w, h = fitted.size
        scale = 504 / max(original.size)
        inner = (round(original.size[0] * scale), round(original.size[1] * scale))
        pad_x, pad_y = (w - inner[0]) // 2, (h - inner[1]) // 2
        arr = np.asarray(fitted).astype(int)
        assert abs(inner[0] - (w - 2 * pad_x)) <= 1 and abs(inner[1] - (h - 2 * pad_y)) <= 1
        if pad_x > 1:
            assert arr[:, : pad_x - 1].max() == 0 and arr[:, w - pad_x + 1:].max() == 0
        if pad_y > 1:
            assert arr[: pad_y - 1].max() == 0 and arr[h - pad_y + 1:].max() == 0
        content = np.asarray(original.resize(inner, Image.Resampling.BICUBIC)).astype(float)
        placed = arr[pad_y: pad_y + inner[1], pad_x: pad_x + inner[0]].astype(float)
        assert np.abs(content - placed).mean() < 1.0
    assert len(shapes) <= len(boxes) <= 8


def test_without_buckets_images_keep_their_aspect_on_the_patch_grid(bone_train):
    fit = ImageFit(512, 28, buckets=False)
    shapes = set()
    for row in bone_train.select(range(0, 989, 7)):
        original = load_image(row["image"])
        fitted = fit(original)
        shapes.add(fitted.size)
        assert all(side % 28 == 0 and 28 <= side <= 504 for side in fitted.size)
        assert max(fitted.size) <= max(504, max(original.size) + 14)  # shrunk or snapped, never blown up
        ratio = (fitted.size[0] / fitted.size[1]) / (original.size[0] / original.size[1])
        assert 0.8 < ratio < 1.25
        assert fit(fitted) is fitted
    assert len(shapes) > 20  # why buckets exist: the real data has dozens of sizes
    tiles = ImageFit(560, 1)  # mllama tiles itself: only the longest side is bounded
    assert tiles(Image.new("RGB", (1200, 600))).size == (560, 280)


def test_prepared_images_are_cached_and_identical_to_fitting_on_the_fly(bone_train, tmp_path):
    fit = ImageFit(256, 28, buckets=True)
    subset = bone_train.select(range(40))
    first, stats = prepare_images(subset, fit, tmp_path / "cache")
    assert stats["images"] == 40 and stats["from_cache"] == 0 and 1 <= stats["distinct_shapes"] <= 8
    again, stats2 = prepare_images(subset, fit, tmp_path / "cache")
    assert stats2["from_cache"] == 40 and again["image"] == first["image"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    for row, prepared in zip(subset.select(range(6)), first.select(range(6))):
        on_the_fly = np.asarray(load_image(row["image"], fit))
        assert np.array_equal(np.asarray(load_image(prepared["image"], fit)), on_the_fly)  # PNG is lossless
        size = Image.open(prepared["image"]).size
        assert prepared["length"] == sample_length(fit, size, prepared["target"])
        assert prepared["length"] == (size[0] // 28) * (size[1] // 28) + 32
    # A different fit or a changed source file is prepared afresh, never served stale.
    assert (prepared_path(tmp_path, subset[0]["image"], fit)
            != prepared_path(tmp_path, subset[0]["image"], ImageFit(512, 28, True)))
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(Path(subset[0]["image"]).read_bytes())
    before = prepared_path(tmp_path, str(copy), fit)
    Image.new("RGB", (50, 90), (255, 0, 0)).save(copy, format="JPEG")
    os.utime(copy, ns=(1, 1))
    assert prepared_path(tmp_path, str(copy), fit) != before


def test_length_groups_ignore_small_differences_in_answer_length():
    fit = ImageFit(512, 28, buckets=True)
    lengths = {sample_length(fit, (504, 252), label) for label in RECIPE.labels}
    assert len(lengths) == 1  # class names must not decide which images share a batch
    long_report = "Findings: " + "a normal chest radiograph with no acute findings. " * 10
    assert sample_length(fit, (504, 252), long_report) > sample_length(fit, (504, 252), "short")


def test_hf_dataset_images_are_prepared_too(tmp_path):
    rows = []
    for i in range(4):
        buf = tmp_path / f"{i}.png"
        Image.new("RGB", (100 + 30 * i, 60), (10 * i, 0, 0)).save(buf)
        rows.append({"image": str(buf), "target": "x", "id": str(i)})
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    prepared, stats = prepare_images(ds, ImageFit(64, 16, True), tmp_path / "c")
    assert stats["images"] == 4 and all(Path(p).is_file() for p in prepared["image"])
    assert all(Image.open(p).size[0] == 64 for p in prepared["image"])


def _run(args, cwd, env_extra=None, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_generic_command_owns_its_process_as_the_recipe_commands_do(bone_break_dir, tmp_path):
    """`python -m unsloth_med.recipes.generic classify`: the time breakdown starts at the process's start and the
    imports are frozen (on a GPU, unsloth is imported first), as for `python -m unsloth_med.recipes.<name>`; it ran
    the pipeline directly, with none of these."""
    run = tmp_path / "run"
    proc = _run(["unsloth_med.recipes.generic", "classify", "--data_dir", str(bone_break_dir / "labels.csv"),
                 "--model", "tiny:mistral3", "--max_steps", "1", "--max_train_samples", "8", "--max_eval_samples", "4",
                 "--eval_before", "false", "--eval_after", "false", "--image_size", "64", "--save_strategy", "no",
                 "--output_dir", str(run)], REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((run / "run.json").read_text())
    assert list(status["timings_s"])[:2] == ["startup", "setup"] and status["timings_s"]["startup"] > 0.5
    assert status["garbage_collection"]["frozen_objects"] > 100_000 and status["recipe"] == "classify"


@pytest.mark.slow
def test_pipeline_records_prepared_images_and_step_stats(bone_break_dir, tmp_path):
    run = tmp_path / "run"
    proc = _run(["unsloth_med.recipes.bone_fracture", "--data_dir", str(bone_break_dir), "--model", "tiny:mistral3",
                 "--max_steps", "6", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                 "--max_train_samples", "48", "--max_eval_samples", "4", "--eval_before", "false",
                 "--image_size", "64", "--save_strategy", "no", "--warm_up_shapes", "true", "--profile_step", "5",
                 "--output_dir", str(run)], REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((run / "train_stats.json").read_text())
    # --profile_step: step 5 ran under torch.profiler (no GPU here: CPU ops only), beside the others' median.
    profile = json.loads((run / "profile_step.json").read_text())
    assert profile["step"] == 5 and profile["micro_batch"] == 4 and profile["gradient_accumulation_steps"] == 1
    assert profile["wall_s"] > 0 and profile["cpu_ops_recorded"] > 1000  # a forward, backward and optimizer step
    assert profile["gpu_kernel_s"] == 0 and profile["kernel_launches"] == 0 and profile["median_unprofiled_step_s"] > 0
    assert "Profile of step 5: GPU kernels 0.000 s" in proc.stdout + proc.stderr
    # The time breakdown starts with the process (interpreter, imports, parsing), so its total is the command's.
    timings = json.loads((run / "run.json").read_text())["timings_s"]
    assert list(timings)[:2] == ["startup", "setup"] and timings["startup"] > 0.5, timings
    # The process's own command froze its imports (collector.py): hundreds of thousands of objects no full
    # collection walks again.
    assert json.loads((run / "run.json").read_text())["garbage_collection"]["frozen_objects"] > 100_000
    assert sum(v for k, v in timings.items() if k != "total") == pytest.approx(timings["total"], abs=0.05)
    assert stats["train_compiled"] is True
    # The memory plan is printed and recorded; without a GPU the configured batch is kept, the effective batch exact.
    plan = stats["memory_plan"]
    assert "Memory plan: no GPU" in proc.stdout and "micro-batch 4 as configured (effective batch 4)" in proc.stdout
    assert plan["micro_batch"] * plan["gradient_accumulation_steps"] == plan["effective_batch"] == 4
    # The warm-up ran inside Trainer.train (where Unsloth keeps its compiled graphs) and recorded itself.
    warm = stats["shape_warmup"]  # 6 steps of 12 per epoch: only the kinds those 6 micro-batches hold
    assert (warm["micro_batch"] == 4 and warm["within_steps"] == 6
            and 6 >= warm["batch_kinds"] == len(warm["seconds_per_batch_kind"]) >= 1)
    assert stats["steps_timed"] == 6 and stats["samples_per_step"] == 4 and len(stats["step_seconds"]) == 6
    steady = stats["step_seconds"][3:]
    assert stats["samples_per_second_all_steps"] == pytest.approx(4 * len(steady) / sum(steady), rel=0.01)
    assert 0 <= stats["data_share"] < 1 and stats["samples_per_second"] > 0 and stats["median_data_wait_seconds"] >= 0
    metrics = json.loads((run / "metrics.json").read_text())
    prepared = metrics["data"]["prepared_images"]
    assert prepared["images"] == 48 and prepared["image_fit"]["buckets"] is True
    info = json.loads((run / "adapter" / "unsloth_med.json").read_text())
    assert info["image_size"] == 64 and info["image_buckets"] is True


def test_profiled_kernels_are_sorted_into_kinds_by_name():
    """Kernel names as the H100/H200 profiles of earlier sessions recorded them (benchmarks/results)."""
    from unsloth_med.profiling import OTHER, kind_of

    assert kind_of("nvjet_sm90_tst_256x144_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kind_of("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize64x32x8_stage3_warpsize1x2x1_ffma") == "matmul"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64") == "attention"
    assert kind_of("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*") == \
        "4-bit dequantize"
    assert kind_of("void kOptimizerStatic8bit2StateBlockwise<float, 0, 256, 1>(float*, float*") == "optimizer"
    assert kind_of("Memcpy DtoH (Device -> Pinned)") == "copy"
    assert kind_of("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at") == \
        "copy"
    assert kind_of("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat1") == \
        OTHER
    assert kind_of("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == OTHER  # a fused RMSNorm, not a copy


def test_profile_step_counts_from_one(tmp_path):
    """--profile_step 0 (or below) would profile nothing: refused when the options are parsed, in one line."""
    from unsloth_med.config import parse_config
    from unsloth_med.errors import ConfigError

    assert parse_config(["--output_dir", str(tmp_path), "--profile_step", "3"], RECIPE).model.profile_step == 3
    for step in ("0", "-2"):
        with pytest.raises(ConfigError, match=f"--profile_step {step}: the optimizer step to profile counts from 1"):
            parse_config(["--output_dir", str(tmp_path), "--profile_step", step], RECIPE)


def test_group_by_length_without_prepared_lengths_is_refused_early(tmp_path):
    proc = _run(["unsloth_med.recipes.bone_fracture", "--demo", "--preprocess_images", "false",
                 "--train_sampling_strategy", "group_by_length", "--output_dir", str(tmp_path / "r")],
                REPO, timeout=300)
    assert proc.returncode != 0 and "preprocess_images" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
    # No GPU visible (also on a GPU machine): a memory cap has nothing to cap and is refused.
    capped = _run(["unsloth_med.recipes.bone_fracture", "--demo", "--max_memory_gib", "24",
                   "--output_dir", str(tmp_path / "c")], REPO, env_extra={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert capped.returncode != 0 and "no CUDA GPU" in capped.stderr and "Traceback" not in capped.stderr


@pytest.mark.slow
def test_bench_cli_runs_a_path_and_writes_json_and_table(bone_break_dir, tmp_path):
    """The bench's plumbing on the CPU (hf-bf16 path, tiny model): real steps, FLOPs, profile, JSON, table."""
    from unsloth_med.models.tiny import tiny_model_path

    model = tiny_model_path("mistral3")
    out = tmp_path / "results"
    proc = _run(["unsloth_med.bench", "--model", str(model), "--data_dir", str(bone_break_dir), "--paths",
                 "hf-bf16,recipe-defaults",
                 "--batch_sizes", "2,4", "--steps", "2", "--warmup", "1", "--image_size", "64", "--profile",
                 "--out", str(out), "--tag", "cpu-test"], REPO, {"UNSLOTH_MED_BENCH_DEVICE": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    result = json.loads((out / f"cpu-test_{model.name}_hf-bf16.json").read_text())
    assert result["data"]["image_buckets"] is True and result["data"]["distinct_sizes"] <= 8
    for entry, bs in zip(result["batches"], (2, 4)):
        assert entry["batch_size"] == bs and len(entry["step_s"]) == 2 and entry["loss_finite"]
        assert entry["samples_per_s"] == pytest.approx(bs / entry["median_step_s"], rel=1e-2)
        assert entry["flops_per_step"] > 0 and 0 <= entry["data_share"] < 1
        assert entry["profile"]["wall_s"] > 0
    # The recipe's own CLI with its defaults, as a row: on a CPU no memory plan, so its configured micro-batch 2.
    defaults = json.loads((out / f"cpu-test_{model.name}_recipe-defaults.json").read_text())
    assert defaults["memory_plan"]["micro_batch"] == 2 and defaults["memory_plan"]["effective_batch"] == 8
    assert len(defaults["batches"][0]["step_s"]) == 3 and defaults["batches"][0]["samples_per_s"] > 0
    assert "--max_steps" in defaults["command_run"] and defaults["timings_s"]["train"] > 0
    summary = json.loads((out / f"cpu-test_{model.name}_summary.json").read_text())
    assert [(r["path"], r["batch_size"]) for r in summary["rows"]] == [("hf-bf16", 2), ("hf-bf16", 4),
                                                                        ("recipe-defaults", 8)]  # 2 x 4 a step
    assert summary["rows"][0]["x_hf_bf16_b2"] == pytest.approx(1.0)
    table = (out / f"cpu-test_{model.name}.md").read_text()
    assert "| hf-bf16 | — | 2 |" in table and "| hf-bf16 | — | 4 |" in table and "| recipe-defaults | — | 8 |" in table
    # Under --max_memory_gib the row carries its cap, for the table and the comparison with the HF rows inside it.
    from unsloth_med.bench import table_rows

    assert "max_memory_gib" in defaults and defaults["max_memory_gib"] is None  # no cap on this run
    capped = {**defaults, "max_memory_gib": 24}
    assert table_rows([capped])[0]["memory_cap_gib"] == 24


def _tiny_mistral3_batch(sizes):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from unsloth_med.models import prompting
    from unsloth_med.models.families import family_of
    from unsloth_med.models.tiny import tiny_model_path

    path = tiny_model_path("mistral3")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    prompting.prepare_processor(processor, family_of(model.config))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    rows = [{"image": None, "target": RECIPE.labels[i], "id": str(i)} for i in range(len(sizes))]
    texts = [prompting.render(processor, RECIPE.to_conversation(r)) for r in rows]
    batch = prompting.encode(processor, texts, images, padding_side="right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return model, batch


@pytest.mark.parametrize("sizes", [[(64, 48)] * 3, [(64, 48), (48, 64), (64, 64)]], ids=["same-size", "mixed"])
def test_batched_vision_tower_computes_what_the_original_computes(sizes):
    import torch

    from unsloth_med.models.speedups import batch_same_size_images

    model, batch = _tiny_mistral3_batch(sizes)
    tower = next(m for m in model.modules() if type(m).__name__ == "PixtralVisionModel")
    with torch.no_grad():
        reference = model(**batch).logits
        reference_tower = tower(batch["pixel_values"], image_sizes=batch["image_sizes"], output_hidden_states=True)
    assert batch_same_size_images(model) == 1
    with torch.no_grad():
        batched = model(**batch).logits
        batched_tower = tower(batch["pixel_values"], image_sizes=batch["image_sizes"], output_hidden_states=True)
    assert torch.allclose(batched, reference, atol=1e-5), (batched - reference).abs().max()
    assert reference_tower.last_hidden_state.shape == batched_tower.last_hidden_state.shape
    assert len(reference_tower.hidden_states) == len(batched_tower.hidden_states)
    for a, b in zip(reference_tower.hidden_states, batched_tower.hidden_states):
        assert torch.allclose(a, b, atol=1e-5)


def test_frozen_vision_tower_gets_no_backward_and_lora_gradients_are_unchanged():
    import torch
    from peft import LoraConfig, get_peft_model

    from unsloth_med.backends.hf import lora_target_regex
    from unsloth_med.config import LoraArgs
    from unsloth_med.models.families import family_of
    from unsloth_med.models.speedups import skip_frozen_vision_backward

    model, batch = _tiny_mistral3_batch([(64, 48)] * 2)
    lora = LoraArgs(finetune_vision_layers=False)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=lora_target_regex(model, family_of(model.config), lora))
    model = get_peft_model(model, config)
    model.enable_input_require_grads()  # what gradient checkpointing setups do: inputs carry gradients
    with torch.no_grad():  # non-zero B so every LoRA factor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    tower = next(m for n, m in model.named_modules() if n.endswith("vision_tower"))
    calls = []
    tower.transformer.layers[0].register_full_backward_hook(lambda *a: calls.append(1))

    def lora_grads():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = lora_grads()
    assert calls, "without the hook, autograd runs the frozen tower's backward"
    calls.clear()
    assert skip_frozen_vision_backward(model) is True
    skipped = lora_grads()
    assert not calls
    assert reference.keys() == skipped.keys() and len(reference) > 0
    for name in reference:
        assert torch.allclose(reference[name], skipped[name], atol=1e-6), name


def test_images_too_large_for_max_seq_length_are_refused_before_training(bone_break_dir, tmp_path):
    run = tmp_path / "run"
    proc = _run(["unsloth_med.recipes.bone_fracture", "--data_dir", str(bone_break_dir), "--model", "tiny:mistral3",
                 "--max_train_samples", "8", "--max_eval_samples", "2", "--image_size", "256",
                 "--max_seq_length", "100",
                 "--eval_before", "false", "--output_dir", str(run)], REPO, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "image tokens" in proc.stderr and "--image_size (now 256)" in proc.stderr
    assert not (run / "train_log.jsonl").exists()  # refused before the trainer started


def test_same_shape_order_makes_pure_batches_of_every_sample_once():
    from collections import Counter

    from unsloth_med.data.batching import same_shape_order

    rng = np.random.default_rng(0)
    shapes = list(rng.choice(["504x504", "252x504", "504x252", "168x504"], size=101, p=[0.5, 0.25, 0.15, 0.1]))
    for batch in (1, 4, 16):
        order = same_shape_order(shapes, batch, seed=1)
        assert sorted(order) == list(range(len(shapes)))
        chunks = [order[i:i + batch] for i in range(0, len(order), batch)]
        mixed = [c for c in chunks if len({shapes[i] for i in c}) > 1]
        assert len(mixed) <= len(set(shapes)) - 1  # only the shapes' remainders mix
        assert all(len(c) == batch for c in chunks[:-1])  # a short batch can only be the last
        pure = Counter(shapes[c[0]] for c in chunks if c not in mixed and len(c) == batch)
        assert sum(pure.values()) >= len(shapes) // batch - len(set(shapes))
    assert same_shape_order(shapes, 4, seed=1) == same_shape_order(shapes, 4, seed=1)
    assert same_shape_order(shapes, 4, seed=1) != same_shape_order(shapes, 4, seed=2)


def test_one_batch_of_each_kind_covers_every_kind_of_batch_in_every_epoch():
    from unsloth_med.data.batching import batch_kind, one_batch_of_each_kind, same_shape_order

    rng = np.random.default_rng(0)
    shapes = list(rng.choice(["504x504", "252x504", "504x252", "168x504"], size=101, p=[0.5, 0.25, 0.15, 0.1]))
    for batch in (4, 16, 32):
        warm = one_batch_of_each_kind(shapes, batch, seed=0)
        warm_kinds = [batch_kind([shapes[i] for i in b]) for b in warm]
        assert len(set(warm_kinds)) == len(warm_kinds)  # each kind once
        assert any(len(kind) > 1 for kind in warm_kinds) and sum(n for _, n in warm_kinds[-1]) == 101 % batch
        for epoch_seed in range(5):  # the sampler reseeds every epoch; the kinds stay the same
            order = same_shape_order(shapes, batch, seed=epoch_seed)
            epoch_kinds = {batch_kind([shapes[i] for i in order[k:k + batch]]) for k in range(0, len(order), batch)}
            assert epoch_kinds == set(warm_kinds)


def test_a_run_shorter_than_an_epoch_warms_up_only_the_kinds_its_steps_meet():
    from unsloth_med.data.batching import batch_kind, one_batch_of_each_kind, same_shape_order

    rng = np.random.default_rng(1)
    shapes = list(rng.choice(["504x504", "252x504", "504x252", "168x504"], size=101, p=[0.5, 0.25, 0.15, 0.1]))
    every = one_batch_of_each_kind(shapes, 8, seed=3)
    kind = lambda batch: batch_kind([shapes[i] for i in batch])  # noqa: E731
    order = same_shape_order(shapes, 8, seed=3)  # what the sampler feeds in the first epoch
    for steps in (1, 4, 9):
        met = {kind(order[k:k + 8]) for k in range(0, steps * 8, 8)}
        warm = one_batch_of_each_kind(shapes, 8, seed=3, max_batches=steps)
        assert {kind(b) for b in warm} == met and len(warm) == len(met) < len(every)
        assert [kind(b) for b in warm] == [kind(b) for b in every if kind(b) in met]  # in epoch order
    assert (one_batch_of_each_kind(shapes, 8, seed=3, max_batches=13)
            == one_batch_of_each_kind(shapes, 8, seed=3, max_batches=1000) == every)  # a whole epoch or more: all


@pytest.mark.slow
def test_trainer_feeds_one_image_shape_per_micro_batch_and_warms_up_each_shape(bone_train, tmp_path):
    """group_by_length over bucketed, prepared images: the real trainer's data loader yields same-shape
    micro-batches, and the shape warm-up runs a real step per shape without changing any weight."""
    import torch

    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import LoraArgs, ModelArgs, parse_config
    from unsloth_med.data.batching import SameShapeSampler, batch_kind, describe_kind
    from unsloth_med.models.families import image_fit
    from unsloth_med.models.tiny import tiny_model_path
    from unsloth_med.train import StepStatsCallback, build_trainer, warm_up_shapes, warm_up_when_training_starts

    backend = HFBackend()
    model, processor = backend.load(str(tiny_model_path("mistral3")), ModelArgs())
    fit = image_fit(model.config, 64, buckets=True)
    prepared, stats = prepare_images(bone_train.shuffle(seed=0).select(range(42)), fit, tmp_path / "cache")
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    collator = backend.collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
    config = parse_config(["--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "4",
                           "--train_sampling_strategy", "group_by_length", "--save_strategy", "no"], RECIPE)
    trainer = build_trainer(model, processor, prepared, collator, config.training, tmp_path)
    loader = trainer.get_train_dataloader()
    assert isinstance(trainer._get_train_sampler(), SameShapeSampler)
    batches = [b["image_sizes"].tolist() for b in loader]
    assert sum(len(sizes) for sizes in batches) == 42 and len(batches[-1]) == 2  # the short batch last
    mixed = [sizes for sizes in batches if len({tuple(s) for s in sizes}) > 1]
    assert len(mixed) <= stats["distinct_shapes"] - 1, mixed

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    warmed = warm_up_shapes(trainer, prepared)
    assert warmed["shapes"] == stats["distinct_shapes"] >= 2 and warmed["last_batch"] == 2
    # Every kind of micro-batch the loader yields (shape counts per batch) was warmed up, each once:
    # each shape's full batches, the mixed remainders and the short last batch.
    loader_kinds = {describe_kind(batch_kind([f"{w}x{h}" for h, w in sizes])) for sizes in batches}
    assert set(warmed["seconds_per_batch_kind"]) == loader_kinds and warmed["batch_kinds"] == len(loader_kinds)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)

    # In runs the warm-up is a callback that Trainer.train calls first, before the step clock starts.
    callback = warm_up_when_training_starts(trainer, prepared)
    callbacks = trainer.callback_handler.callbacks
    assert callbacks.index(callback) < next(i for i, c in enumerate(callbacks) if isinstance(c, StepStatsCallback))


@pytest.mark.slow
def test_bench_speedups_time_same_shape_batches_after_each_shape_warmed_up(bone_break_dir, tmp_path):
    from unsloth_med.models.tiny import tiny_model_path

    model = tiny_model_path("mistral3")
    out = tmp_path / "results"
    proc = _run(["unsloth_med.bench", "--model", str(model), "--data_dir", str(bone_break_dir), "--paths",
                 "hf-bf16,recipe-defaults",
                 "--batch_sizes", "2", "--steps", "4", "--warmup", "0", "--image_size", "64", "--no_flops",
                 "--speedups", "--unchecked_layers", "1", "--out", str(out), "--tag", "cpu-test"], REPO,
                {"UNSLOTH_MED_BENCH_DEVICE": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    result = json.loads((out / f"cpu-test_{model.name}_hf-bf16-speedups-unchecked1.json").read_text())
    entry = result["batches"][0]
    assert set(entry["step_shapes"]) - {"mixed"} <= set(entry["warmup_shapes"])  # no timed step sees a new shape
    assert len(entry["step_s"]) == 4 and entry["loss_finite"]
    language_checked, language_layers = map(int, result["checkpointed_layers"]["language"].split("/"))
    assert result["unchecked_layers"] == 1 and language_checked == language_layers - 1
    table = (out / f"cpu-test_{model.name}.md").read_text()
    assert "| hf-bf16 +speedups +unchecked1 | — | 2 |" in table

    # --merge: a result already in --out and unchanged is not copied again under the new tag; one from
    # elsewhere is, and two runs with the same settings get their batch sizes in the file name.
    from unsloth_med.cli.bench import bench_command

    here = out / f"cpu-test_{model.name}_hf-bf16-speedups-unchecked1.json"
    elsewhere = tmp_path / "other" / "run.json"
    elsewhere.parent.mkdir()
    other = json.loads(here.read_text())
    other["batches"][0]["batch_size"] = 4
    elsewhere.write_text(json.dumps(other))
    assert bench_command(["--merge", str(here), str(elsewhere), "--tag", "merged", "--out", str(out)]) == 0
    written = sorted(p.name for p in out.glob("merged_*.json"))
    assert written == [f"merged_{model.name}_hf-bf16-speedups-unchecked1-b4.json", f"merged_{model.name}_summary.json"]
    assert [r["batch_size"]
            for r in json.loads((out / f"merged_{model.name}_summary.json").read_text())["rows"]] == [2, 4]


@pytest.mark.parametrize("flags, says", [
    (["--batch_sizes", "2,x"], "--batch_sizes 2,x: whole numbers above 0"),  # was an int() traceback
    (["--batch_sizes", "0"], "--batch_sizes 0: whole numbers above 0"),  # was a failed row after loading the model
    (["--steps", "0"], "--steps 0: at least 1"),  # was a median of no steps in the worker
    (["--max_memory_gib", "0"], "--max_memory_gib 0: a size in GiB above 0"),  # was silently no cap
])
def test_bench_numbers_are_checked_before_any_work(flags, says, tmp_path):
    from unsloth_med.cli.bench import bench_command
    from unsloth_med.errors import ConfigError

    out = tmp_path / "results"
    with pytest.raises(ConfigError, match=re.escape(says)):
        bench_command(["--model", str(tmp_path / "nowhere"), "--out", str(out), *flags])
    assert not out.exists()  # nothing started


def test_checkpoint_fewer_layers_keeps_gradients_identical():
    """Taking layers out of gradient checkpointing changes memory and time, never the gradients."""
    import torch

    from unsloth_med.models.speedups import checkpoint_fewer_layers, checkpointed_layers

    model, batch = _tiny_mistral3_batch([(64, 48)] * 2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def grads():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    checked, total = map(int, checkpointed_layers(model)["language"].split("/"))
    assert checked == total >= 2
    assert checkpoint_fewer_layers(model, 1) == 1
    assert checkpointed_layers(model)["language"] == f"{total - 1}/{total}"
    assert checkpoint_fewer_layers(model, 99) == total - 1  # never more than there are
    partial = grads()
    assert reference.keys() == partial.keys()
    for name in reference:
        assert torch.allclose(reference[name], partial[name], atol=1e-6), name


def test_bench_table_compares_a_capped_row_with_the_hf_rows_inside_its_cap():
    """The H200 result files in benchmarks/results: ratios and the 6N MFU are computed from what they hold."""
    from unsloth_med.bench import table_rows

    results = [json.loads((REPO / "benchmarks" / "results" / f"20261202-h200_ministral3-14b_{name}.json").read_text())
               for name in ("hf-bf16", "hf-qlora-cap24", "unsloth-4bit-speedups-gc-true-cap24")]
    bf16, qlora, ours = table_rows(results)
    assert ours["memory_cap_gib"] == 24 and qlora["peak_reserved_gib"] <= 24 < bf16["peak_reserved_gib"]
    # hf-qlora reserved more than the unsloth row at peak, but ran under the same cap: it is the comparison.
    assert qlora["peak_reserved_gib"] > ours["peak_reserved_gib"]
    assert ours["x_best_hf_same_memory"] == pytest.approx(ours["samples_per_s"] / qlora["samples_per_s"])
    assert ours["x_hf_bf16_b2"] == pytest.approx(ours["samples_per_s"] / bf16["samples_per_s"])
    shape, rate = results[2]["shape"], results[2]["matmul_tflops"]
    assert ours["mfu_6n"] == pytest.approx(6 * shape["params"] * ours["tokens_per_s"] / (rate * 1e12))


def test_compile_seconds_since_counts_the_tracing_a_compiled_call_did():
    """The warm-up records where its seconds went (train_stats.json's shape_warmup.compile_seconds): dynamo's own
    accounting of the tracing done since a point, the phases that took time, longest first."""
    import torch

    from unsloth_med.train import compile_seconds, compile_seconds_since

    before = compile_seconds()
    layer = torch.nn.Linear(8, 8)
    compiled = torch.compile(lambda x: torch.relu(layer(x)) * 2, backend="eager")
    compiled(torch.randn(4, 8))
    spent = compile_seconds_since(before, at_least=0.0)
    assert spent["_compile.compile_inner"] > 0 and "bytecode_tracing" in spent
    assert list(spent.values()) == sorted(spent.values(), reverse=True)
    assert compile_seconds_since(compile_seconds()) == {}  # nothing traced since: nothing recorded
