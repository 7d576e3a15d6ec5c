"""Interrupts and failures around a real run: what the folder says afterwards, and what the next command does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _trainer(tiny_path, bone_break_dir, out: Path, *flags: str):
    """A real TRL trainer on the tiny Ministral-3 with fresh LoRA adapters and 8 real X-rays (4 steps an epoch)."""
    import datasets

    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import LoraArgs, ModelArgs, parse_config
    from unsloth_med.recipes.bone_fracture import RECIPE
    from unsloth_med.train import build_trainer

    root = bone_break_dir / "Bone Break Classification" / "Bone Break Classification"
    images = sorted(root.glob("*/Train/*.jpg"))[::120][:8]
    rows = [{"image": str(p), "target": p.parts[-3], "id": str(i)} for i, p in enumerate(images)]
    backend = HFBackend()
    model, processor = backend.load(str(tiny_path("mistral3")), ModelArgs())
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    collator = backend.collator(model, processor, RECIPE, image_size=32, max_seq_length=4096)
    config = parse_config(["--output_dir", str(out), "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_steps", "3",
                           "--learning_rate", "1e-2", "--train_sampling_strategy", "random", *flags], RECIPE)
    return build_trainer(model, processor, datasets.Dataset.from_list(rows), collator, config.training, out)


def _adapter_weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_resuming_from_the_final_checkpoint_loads_it_and_trains_no_step_past_max_steps(tiny_path, bone_break_dir,
                                                                                         tmp_path, capsys, caplog):
    """A run interrupted after training (in evaluation, export) and resumed finds its final checkpoint. Trainer.train
    from it took a 4th step of a 3-step run (3 is not a whole number of 4-step epochs), at a constant learning rate:
    other weights than the run trained, and a checkpoint-4."""
    from unsloth_med.train import train

    flags = ("--max_steps", "3", "--lr_scheduler_type", "constant")
    first = _trainer(tiny_path, bone_break_dir, tmp_path, *flags)
    train(first, compiled=False)
    trained = _adapter_weights(first.model)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]

    resumed = _trainer(tiny_path, bone_break_dir, tmp_path, *flags)  # fresh adapters, as a new process builds them
    assert any(not (trained[n] == w).all() for n, w in _adapter_weights(resumed.model).items())
    capsys.readouterr()
    history = train(resumed, resume_from=str(tmp_path / "checkpoint-3"), compiled=False)
    out = capsys.readouterr().out
    assert "already holds step 3 of the 3 this run trains" in caplog.text and "step 4/3" not in out, out
    assert resumed.state.global_step == 3 and [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    for name, weight in _adapter_weights(resumed.model).items():  # exactly the weights the run trained
        assert (weight == trained[name]).all(), name

    # A resume that has steps left still trains them (from checkpoint-3 to 5).
    more = _trainer(tiny_path, bone_break_dir, tmp_path, "--max_steps", "5", "--lr_scheduler_type", "constant")
    train(more, resume_from=str(tmp_path / "checkpoint-3"), compiled=False)
    assert more.state.global_step == 5
    assert json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())["global_step"] == 5


def test_a_log_line_cut_off_mid_write_does_not_stop_the_resume(tmp_path):
    """The interrupted run's last train_log.jsonl record was cut off (a kill or power loss mid-append, a full disk:
    a partial line, or NUL bytes on ext4). --resume failed in the Trainer's first callback with a JSONDecodeError
    traceback; it drops that record as it drops every record after the checkpoint."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from unsloth_med.train import JsonlLogCallback

    path = tmp_path / "train_log.jsonl"
    whole = "".join(json.dumps({"step": k, "loss": 1.0 / k}) + "\n" for k in range(1, 5))
    args = TrainingArguments(str(tmp_path / "out"), report_to="none")
    for cut in ('{"step": 5, "loss": 0.1', "\0" * 40):
        path.write_text(whole + cut)
        JsonlLogCallback(path).on_train_begin(args, TrainerState(global_step=3), TrainerControl())
        JsonlLogCallback(path).on_log(args, TrainerState(global_step=4), TrainerControl(), logs={"loss": 0.2})
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def _main(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`unsloth-med ARGV` in this process (its own error handling and exit code), without a fresh interpreter."""
    from unsloth_med.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.mark.slow  # four tiny commands in this process: a run, evaluate, export, the resumed run
def test_a_crash_in_evaluation_after_training_keeps_the_training_and_says_how_to_finish(bone_break_dir, tmp_path,
                                                                                       capsys, caplog, monkeypatch):
    import unsloth_med.evaluate as evaluation

    run_dir = tmp_path / "run"
    argv = ["train", "--recipe", "bone_fracture", "--data_dir", str(bone_break_dir), "--output_dir", str(run_dir),
            "--model", "tiny:mistral3", "--backend", "hf", "--max_train_samples", "8", "--max_eval_samples", "4",
            "--image_size", "32", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_steps", "3", "--save_steps", "10", "--export", "merged-16bit"]
    real, calls = evaluation.evaluate, []

    def crashes_after_training(*args, **kwargs):  # the pass after training fails (a bug, a driver error)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("planted failure in the evaluation after training")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", crashes_after_training)
    from unsloth_med.cli import main

    with pytest.raises(RuntimeError, match="planted failure") as failed:
        main(argv)
    monkeypatch.setattr(evaluation, "evaluate", real)
    hint = " ".join(getattr(failed.value, "__notes__", []))  # printed under the traceback
    assert f"trained model is saved in {run_dir / 'adapter'}" in hint and "eval_after stage" in hint, hint
    assert f"--resume loads {run_dir / 'checkpoint-3'} (no training step)" in hint, hint
    assert f"`unsloth-med evaluate --model {run_dir}`" in hint and f"`unsloth-med export {run_dir} --format " \
        "merged-16bit`" in hint, hint
    status = json.loads((run_dir / "run.json").read_text())
    assert status["stage"] == "eval_after" and status["complete"] is False
    assert (run_dir / "adapter" / "unsloth_med.json").is_file() and not (run_dir / "eval_after.json").exists()
    assert hint in (run_dir / "run.log").read_text()

    # The commands it names work on that folder, without training.
    code, out, err = _main(capsys, ["evaluate", "--model", str(run_dir)])
    assert code == 0 and "Test examples" in out and " 4" in out.split("Test examples")[1].splitlines()[0], err[-2000:]
    code, out, err = _main(capsys, ["export", str(run_dir), "--format", "merged-16bit"])
    assert code == 0 and (run_dir / "merged" / "export.json").is_file(), err[-2000:]
    caplog.clear()
    code, out, err = _main(capsys, [*argv, "--resume"])
    assert code == 0, err[-3000:]
    assert "already holds step 3 of the 3" in caplog.text and not any(line.startswith("step ") for line in
                                                                      out.splitlines())
    # The export made above is of this very adapter: kept as merged/, not set aside as an earlier model's.
    assert "superseded" not in caplog.text and not list(run_dir.glob("merged-superseded-*"))
    assert json.loads((run_dir / "run.json").read_text())["complete"] is True
    assert (run_dir / "eval_after.json").is_file() and (run_dir / "report.md").is_file()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3"]


@pytest.mark.slow  # two tiny runs in this process
def test_a_resume_on_another_test_split_scores_the_untrained_model_on_it_again(bone_break_dir, tmp_path, capsys,
                                                                               caplog):
    """Resumed with other test examples (here --max_eval_samples; likewise new data or another split), the run kept
    the first run's before-training scores: the table's change compared 4 examples before with 6 after."""
    run_dir = tmp_path / "run"
    argv = ["train", "--recipe", "bone_fracture", "--data_dir", str(bone_break_dir), "--output_dir", str(run_dir),
            "--model", "tiny:mistral3", "--backend", "hf", "--max_train_samples", "8", "--image_size", "32",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "2",
            "--save_steps", "1", "--eval_batch_size", "8"]
    code, _, err = _main(capsys, [*argv, "--max_eval_samples", "4"])
    assert code == 0, err[-3000:]
    first = json.loads((run_dir / "eval_before.json").read_text())

    code, _, err = _main(capsys, [*argv, "--max_eval_samples", "6", "--resume"])
    assert code == 0, err[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["before"]["n"] == metrics["after"]["n"] == 6, (metrics["before"]["n"], metrics["after"]["n"])
    assert "scored other test examples than this run's test split" in caplog.text
    caplog.clear()
    before = json.loads((run_dir / "eval_before.json").read_text())
    assert {p["id"] for p in first["predictions"]} < {p["id"] for p in before["predictions"]}

    # Resumed on the same examples, the scores measured the first time are kept (not measured again).
    code, _, err = _main(capsys, [*argv, "--max_eval_samples", "6", "--resume"])
    assert code == 0 and "scored other test examples" not in caplog.text, err[-3000:]
    assert json.loads((run_dir / "eval_before.json").read_text()) == before

    # Cut off mid-write (a kill while the run above wrote it): measured again, not a JSONDecodeError traceback.
    (run_dir / "eval_before.json").write_text((run_dir / "eval_before.json").read_text()[:3000])
    code, _, err = _main(capsys, [*argv, "--max_eval_samples", "6", "--resume"])
    assert code == 0, err[-3000:]
    assert json.loads((run_dir / "eval_before.json").read_text())["predictions"] == before["predictions"]


@pytest.mark.parametrize("export", ["adapter", "merged-16bit", "gguf"])
def test_the_finish_hint_pushes_as_the_run_would_have(export, tmp_path):
    """A run with --push_to_hub_id and --hub_public true that failed in its export stage: the hint's command pushed
    without --public, to a new private repo (and an existing public one of an earlier push was refused)."""
    from unsloth_med.config import parse_config
    from unsloth_med.pipeline import RunContext, finish_hint
    from unsloth_med.recipes.bone_fracture import RECIPE

    run_dir = tmp_path / "run"
    for public, flag in ((["--hub_public", "true"], " --public"), ([], "")):
        config = parse_config(["--output_dir", str(run_dir), "--export", export, "--push_to_hub_id", "me/x", *public],
                              RECIPE)
        ctx = RunContext(RECIPE, config, run_dir=run_dir, trained_step=30, current_stage="export")
        hint = finish_hint(ctx)
        assert f"`unsloth-med export {run_dir} --format {export} --push-to-hub me/x{flag}`" in hint, hint


@pytest.mark.slow  # a real training process, stopped by a real SIGTERM
def test_sigterm_ends_a_run_as_ctrl_c_does(bone_break_dir, tmp_path):
    """`kill PID` (a cloud VM's preemption, a scheduler's stop) ended the process at once: exit 143 with no word on
    stderr, run.json without the time breakdown, the lock file left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    log = tmp_path / "out.txt"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "unsloth_med.cli", "train", "--recipe", "bone_fracture", "--data_dir",
             str(bone_break_dir), "--output_dir", str(run_dir), "--model", "tiny:mistral3", "--backend", "hf",
             "--max_train_samples", "8", "--max_eval_samples", "4", "--image_size", "32", "--eval_before", "false",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "100000",
             "--save_steps", "2"], stdout=out, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        # Any saved checkpoint will do: with save_total_limit 2, checkpoint-2 is gone by step 6, and a poll that
        # waited for it alone could miss it and signal a run that had already finished.
        deadline = time.time() + 300
        while not any(run_dir.glob("checkpoint-*/trainer_state.json")):
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert "terminated (SIGTERM)" in err and "--resume continues from its last checkpoint" in err, err[-3000:]
    status = json.loads((run_dir / "run.json").read_text())
    assert status["stage"] == "train" and status["complete"] is False and "train" in status["timings_s"], status
    assert not (run_dir / ".unsloth_med.lock").exists()
