"""Session 20's review: label scoring's batch seconds with scores read one batch late, the adapters folded when the
dequantized copies of the other 4-bit layers do not also fit, the profiler closed after a failed profiled step, and
the captioning benchmark's 4-bit passes run as 4-bit."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require
from PIL import Image
from test_evaluate import IMAGE_SIZE, RECIPE, _load, _lora, _quantize_language_model, _rows

REPO = Path(__file__).resolve().parents[1]


def _png(seed: int, side: int = 1200) -> bytes:
    """A large noise PNG: decoding it takes a measurable time, as a real X-ray's does."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_batch_seconds_leave_out_the_wait_for_prepared_batches(tiny_path):
    """batch_seconds and waited_s are parts of a pass (benchmarks/README's "preparing / waiting / the batches"):
    with scores read one batch late, a batch's seconds still leave out the time spent waiting for its inputs, so
    the two together are at most the pass's time. Here (a CPU: batches prepared in the caller's thread) every
    batch's decoding is a wait."""
    from unsloth_med.evaluate.classify import _iter_scored
    from unsloth_med.evaluate.packed import remember_check
    from unsloth_med.models.families import family_of

    model, processor = _load(tiny_path, "mistral3")
    remember_check(model, family_of(model.config), {"checked_rows": 2, "agreed": True})
    rows = [{"image": {"bytes": _png(i)}, "target": RECIPE.labels[i % 2], "id": f"r{i}"} for i in range(6)]
    stats: dict = {}
    with torch.inference_mode():
        started = time.perf_counter()
        predictions = list(_iter_scored(model, processor, RECIPE, rows, RECIPE.labels, batch_size=2,
                                        image_size=IMAGE_SIZE, progress=False, strategy="packed", stats=stats))
        wall = time.perf_counter() - started
    assert [p["id"] for p in predictions] == [f"r{i}" for i in range(6)]
    assert len(stats["batch_seconds"]) == 3 and stats["waited_s"] > 0.05, stats
    assert sum(stats["batch_seconds"]) + stats["waited_s"] <= wall + 0.01, (stats, wall)


def test_generation_folds_the_adapters_where_the_dequantized_rest_would_not_also_fit(tiny_path, monkeypatch):
    """A pass that generates dequantizes the 4-bit layers without an adapter by default (evaluate(dequantize=None)).
    Where the adapters' folded weights fit half the free memory but those and the dequantized rest together do not,
    the adapters are still folded (as before that default): the fold, not the dequantization, is the larger gain
    (395 against 174 generated tokens/s on the 11B shape, README), and it must not be lost to the new default."""
    require("bitsandbytes")  # a test dependency (pyproject's test extra): runs in CI
    from unsloth_med.evaluate import evaluate
    from unsloth_med.models import folding

    model, processor = _load(tiny_path, "mistral3")
    _quantize_language_model(model)
    tuned = _lora(model)
    lora = folding.foldable_layers(tuned)
    plain = folding.quantized_layers(tuned, lora)
    assert lora and plain
    # The memory the budget leaves free: room for the folded adapters, not for the dequantized rest too.
    free = 2 * folding._fold_size(lora) + 1024
    assert 2 * folding._fold_size(lora + plain) > free
    monkeypatch.setattr(folding, "free_memory_bytes", lambda device: free)
    kw = dict(batch_size=2, image_size=IMAGE_SIZE, progress=False, mode="generate", max_new_tokens=2)
    default = evaluate(tuned, processor, RECIPE, _rows(2), **kw)["folded_adapters"]
    assert default["layers"] == len(lora) and default.get("dequantized_layers", 0) == 0, default
    assert "do not also fit" in default["dequantize_skipped"], default
    # With room for both, both are done; with room for neither, neither (the memory rule).
    monkeypatch.setattr(folding, "free_memory_bytes", lambda device: 2 * folding._fold_size(lora + plain))
    both = evaluate(tuned, processor, RECIPE, _rows(2), **kw)["folded_adapters"]
    assert both["layers"] == len(lora) and both["dequantized_layers"] == len(plain), both
    monkeypatch.setattr(folding, "free_memory_bytes", lambda device: folding._fold_size(lora))
    neither = evaluate(tuned, processor, RECIPE, _rows(2), **kw)["folded_adapters"]
    assert neither["layers"] == 0 and "more than half" in neither["reason"], neither


def _profile_run_failing_at(monkeypatch, tmp_path, failing_step: int, max_steps: int) -> tuple[list, list[str]]:
    """A bone-fracture run with --profile_step 2 whose optimizer step `failing_step` raises RuntimeError("step N
    fails"): the steps taken so far (a list) and the run's argv."""
    optimizer_steps = []
    step = torch.optim.AdamW.step

    def failing(self, *args, **kwargs):
        optimizer_steps.append(1)
        if len(optimizer_steps) == failing_step:
            raise RuntimeError(f"step {failing_step} fails")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing)
    return optimizer_steps, ["--model", "tiny:mistral3", "--max_steps", str(max_steps), "--image_size", "64",
                             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                             "--max_train_samples", "16", "--max_eval_samples", "2", "--eval_before", "false",
                             "--save_strategy", "no", "--profile_step", "2", "--output_dir", str(tmp_path / "run")]


def test_a_failed_profiled_step_leaves_no_profiler_running(bone_break_dir, tmp_path, monkeypatch):
    """--profile_step N: a step that fails while it is profiled (out of memory, an interrupt) does not leave
    torch.profiler recording the rest of the process (the Trainer calls no callback after an error)."""
    from unsloth_med.cli.train import train_command
    from unsloth_med.recipes.bone_fracture import RECIPE as BONES

    optimizer_steps, argv = _profile_run_failing_at(monkeypatch, tmp_path, failing_step=2, max_steps=3)
    try:
        with pytest.raises(RuntimeError, match="step 2 fails"):
            train_command(["--data_dir", str(bone_break_dir), *argv], BONES)
        assert len(optimizer_steps) == 2
        assert not torch.autograd.profiler._is_profiler_enabled, "the profiler still records after the failed step"
    finally:
        if torch.autograd.profiler._is_profiler_enabled:  # leave no profiler to the tests after this one
            torch.autograd._disable_profiler()


def test_a_profile_is_written_when_its_step_ends_and_survives_a_later_failure(bone_break_dir, tmp_path, monkeypatch):
    """--profile_step 2, then step 3 fails: profile_step.json was written when step 2 ended (before, only at the end
    of training, so a later failure lost it), and names the run's global step beside this training's count."""
    from unsloth_med.cli.train import train_command
    from unsloth_med.recipes.bone_fracture import RECIPE as BONES

    _, argv = _profile_run_failing_at(monkeypatch, tmp_path, failing_step=3, max_steps=4)
    with pytest.raises(RuntimeError, match="step 3 fails"):
        train_command(["--data_dir", str(bone_break_dir), *argv], BONES)
    profile = json.loads((tmp_path / "run" / "profile_step.json").read_text())
    assert profile["step"] == 2 and profile["global_step"] == 2 and profile["cpu_ops_recorded"] > 0, profile
    assert "median_unprofiled_step_s" not in profile  # training did not end: no median of the other steps


def test_the_caption_benchmark_s_4bit_passes_do_not_dequantize(bone_break_dir, tmp_path):
    """benchmarks/caption_generation.py compares the 4-bit model with the dequantized one, and the adapters folded
    or unfolded with the rest dequantized or not: since generation dequantizes by default, its "4-bit", "LoRA
    folded" and "LoRA unfolded" passes must ask for none (on a CPU no layer is 4-bit, and the record says what was
    asked)."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "caption_generation.py"), str(out),
                           "--bone_break", str(bone_break_dir), "--images", "2", "--model", "tiny:mistral3",
                           "--image_size", "64", "--max_new_tokens", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    passes = {p["pass"]: p["folded_adapters"] for p in json.loads((out / "caption_generation.json").read_text())
              ["passes"] if p["pass"] != "warm-up"}
    assert passes["4-bit #1"] == {"layers": 0, "reason": "no LoRA adapters to fold"}, passes
    assert passes["dequantized #1"]["reason"] == "no LoRA adapters to fold and no 4-bit layers", passes
    assert "dequantized_layers" not in passes["LoRA folded"] and passes["LoRA folded"]["layers"] > 0, passes
    assert passes["LoRA unfolded"] == {"layers": 0, "reason": "disabled"}, passes
    assert passes["LoRA folded, rest dequantized"]["dequantized_layers"] == 0, passes
