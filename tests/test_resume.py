"""Crash and resume: kill -9 a real training run after a checkpoint, --resume it, and get the same run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # three training runs, one killed with -9; CI runs it

ARGS = ["--model", "tiny:mistral3", "--max_steps", "9", "--save_steps", "3", "--save_total_limit", "5",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
        "--max_train_samples", "40", "--max_eval_samples", "4", "--eval_before", "false", "--eval_after", "false",
        "--image_size", "64", "--seed", "7", "--logging_steps", "1"]


def _cmd(data_dir, out, *extra):
    return [sys.executable, "-m", "unsloth_med.recipes.bone_fracture", "--data_dir", str(data_dir),
            "--output_dir", str(out), *ARGS, *extra]


def _final_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["global_step"] == 9
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


FAKE_SECRETS = {"HF_TOKEN": "hf_PlantedFakeToken0123456789abcdefXYZ", "KAGGLE_KEY": "planted-kaggle-key-5f3e9a1c77",
                "KAGGLE_USERNAME": "planted-user", "WANDB_API_KEY": "planted-wandb-key-0c1d2e3f"}


def test_kill_dash_nine_then_resume_matches_an_uninterrupted_run(bone_break_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **FAKE_SECRETS}
    straight = tmp_path / "straight"
    done = subprocess.run(_cmd(bone_break_dir, straight), check=True, env=env, capture_output=True, timeout=600)

    # No planted secret reaches any file of the complete run folder, nor its output.
    secrets = [v.encode() for k, v in FAKE_SECRETS.items() if k != "KAGGLE_USERNAME"]
    files = [p for p in straight.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert not any(s in data for s in secrets), path
    assert not any(s in done.stdout + done.stderr for s in secrets)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_cmd(bone_break_dir, crashed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (crashed / "checkpoint-3" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = json.loads((crashed / "run.json").read_text())
    assert not status.get("complete") and status["stage"] == "train"  # no claim of completion it didn't reach

    # Without --resume the folder is protected; with it, training continues from the last complete checkpoint.
    refused = subprocess.run(_cmd(bone_break_dir, crashed), env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    from unsloth_med.train import last_checkpoint

    resumed_from = int(Path(last_checkpoint(crashed)).name.split("-")[-1])  # 3 or 6: where the kill found it
    resumed = subprocess.run(_cmd(bone_break_dir, crashed, "--resume"), check=True, env=env, capture_output=True,
                             text=True, timeout=600)
    # It continued: its first step is the one after the checkpoint (a retrain from step 1 gives the same losses).
    steps = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert steps and steps[0] == f"{resumed_from + 1}/9" and steps[-1] == "9/9", steps

    assert json.loads((crashed / "run.json").read_text())["complete"] is True
    # train_log.jsonl holds every step once: what the killed run logged after its checkpoint was dropped.
    logged = [json.loads(line) for line in (crashed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 10))
    assert len([r for r in logged if "train_runtime" in r]) == 1
    expected, got = _final_losses(straight), _final_losses(crashed)
    assert sorted(got) == list(range(1, 10))
    for step in (7, 8, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-3, abs=1e-4), (step, got[step], expected[step])


def test_the_training_log_keeps_each_step_once_across_a_resume(tmp_path):
    """The interrupted run logged steps 1-5 and a summary; resumed from checkpoint-3, the log keeps 1-3 and the
    resumed session appends 4 on (a kill between checkpoints left steps 4-5 in it twice)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from unsloth_med.train import JsonlLogCallback

    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*({"step": k, "loss": 1.0 / k} for k in range(1, 6)),
                                                            {"step": 5, "train_runtime": 9.0}]))
    callback, args = JsonlLogCallback(path), TrainingArguments(str(tmp_path / "out"), report_to="none")
    callback.on_train_begin(args, TrainerState(global_step=3), TrainerControl())
    callback.on_log(args, TrainerState(global_step=4), TrainerControl(), logs={"loss": 0.2})
    assert [(r["step"], "loss" in r) for r in map(json.loads, path.read_text().splitlines())] == \
        [(1, True), (2, True), (3, True), (4, True)]
    fresh = JsonlLogCallback(path)  # a run from step 0 (a new run into a new folder) keeps what it finds
    fresh.on_train_begin(args, TrainerState(global_step=0), TrainerControl())
    assert len(path.read_text().splitlines()) == 4
