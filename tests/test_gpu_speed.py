"""Fast by default on the GPU (issue 15), through the real CLI and the unsloth backend, on a tiny model.

Run on the device:   python -m pytest tests/test_gpu_speed.py -m gpu -v -s
- The defaults plan memory: the whole effective batch in one micro-batch when it fits (accumulation 1, the
  effective batch unchanged), every layer keeping its activations, printed and recorded.
- A second identical run reuses the compile caches that the first wrote into the package's cache folder, and the
  memory plan the first probed (memory_plans/ there), without probing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth"),
]

REPO = Path(__file__).resolve().parents[1]


def test_defaults_plan_memory_and_a_second_run_reuses_the_compile_cache(tmp_path):
    from unsloth_med.data.synthetic import write_synthetic_fractures

    data = write_synthetic_fractures(tmp_path / "data", train_per_class=4, test_per_class=1, size=128, seed=0)
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION")}
    env.update(UNSLOTH_MED_CACHE=str(cache), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    stats, outs = [], []
    for attempt in (1, 2):
        run = tmp_path / f"run{attempt}"
        proc = subprocess.run([sys.executable, "-m", "unsloth_med.recipes.bone_fracture", "--data_dir", str(data),
                               "--model", "tiny:mistral3", "--backend", "unsloth", "--max_steps", "3",
                               "--image_size", "128", "--max_eval_samples", "4", "--save_strategy", "no",
                               "--output_dir", str(run)], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
        stats.append(json.loads((run / "train_stats.json").read_text()))
    first, second = stats
    print(f"\nplan: {first['memory_plan']}\ncompile cache: {first['compile_cache']} -> {second['compile_cache']}\n"
          f"warm-up s: {first['shape_warmup']['seconds']} -> {second['shape_warmup']['seconds']}")
    plan = first["memory_plan"]
    assert "Memory plan: budget" in outs[0] and "micro-batch 8 (the whole effective batch fits)" in outs[0]
    assert plan["micro_batch"] == 8 and plan["gradient_accumulation_steps"] == 1 and plan["effective_batch"] == 8
    assert first["micro_batch"] == 8 and first["samples_per_step"] == 8
    kept, total = plan["language_layers_unchecked"].split("/")
    assert kept == total and int(total) > 0  # a tiny model's activations all fit: nothing recomputed
    assert plan["checkpointing"] == "gpu"
    # The first run probed and kept its plan; the identical second run applied it without probing.
    assert plan["probes"] > 0 and plan["stored_at"].startswith(str(cache / "memory_plans"))
    reused = second["memory_plan"]
    assert reused["probes"] == 0 and reused["reused_from"] == plan["stored_at"], reused
    assert (reused["micro_batch"], reused["language_layers_unchecked"]) == (8, plan["language_layers_unchecked"])
    assert "probed by an identical earlier run" in outs[1]
    # The caches live in the package's cache folder, and the second run reads what the first wrote.
    assert first["compile_cache"]["inductor_cache_dir"] == str(cache / "torchinductor")
    assert any((cache / "torchinductor").rglob("*")), "the first run left nothing in the inductor cache"
    compiled = first["compile_cache"]["fxgraph_misses"] + first["compile_cache"]["fxgraph_hits"]
    assert compiled > 0, first["compile_cache"]
    assert second["compile_cache"]["fxgraph_hits"] > 0
    assert second["compile_cache"]["fxgraph_misses"] < first["compile_cache"]["fxgraph_misses"]
