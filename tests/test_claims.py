"""What the run and the CI say about themselves is what they do: CI's own setting, the loss plot's legend,
train_stats.json's record of the frozen-vision speedup."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_script_sets_ci_itself_so_missing_real_data_fails(tmp_path):
    """Whatever the runner sets, `.ci/run` runs the tests with CI=true (real-data tests fail, never skip)."""
    seen = tmp_path / "seen"
    fake_python = tmp_path / "bin" / "python3"
    fake_python.parent.mkdir()
    fake_python.write_text(f'#!/bin/sh\necho "CI=${{CI:-unset}} $*" >> {seen}\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{fake_python.parent}:{env['PATH']}"
    done = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pytest_call = [line for line in seen.read_text().splitlines() if "-m pytest" in line]
    assert pytest_call and pytest_call[0].startswith("CI=true ")


def test_loss_plot_legend_counts_the_moving_average_in_steps_and_logged_points():
    from unsloth_med.evaluate.report import moving_average_label

    assert moving_average_label(list(range(1, 41)), 4) == "moving average (4 steps)"
    # The demo logs every 25 steps: 4 logged points span 100 steps.
    assert moving_average_label(list(range(25, 1001, 25)), 4) == "moving average (4 logged points, 100 steps)"


def test_train_stats_say_the_vision_backward_is_skipped_only_when_the_tower_is_frozen():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from unsloth_med.backends.hf import lora_target_regex
    from unsloth_med.config import LoraArgs
    from unsloth_med.models.families import family_of
    from unsloth_med.models.speedups import apply_training_speedups
    from unsloth_med.models.tiny import tiny_model_path

    for vision, skipped in ((True, False), (False, True)):
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_path("mistral3"))
        lora = LoraArgs(finetune_vision_layers=vision)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=lora_target_regex(model, family_of(model.config), lora))
        model = get_peft_model(model, config)
        tower = next(m for n, m in model.named_modules() if n.endswith("vision_tower"))
        assert any(p.requires_grad for p in tower.parameters()) is vision
        assert apply_training_speedups(model)["frozen_vision_backward_skipped"] is skipped
