"""The pipeline's stages and the time breakdown every run ends with (issue 15 point 6, issue 20 point 4)."""
from __future__ import annotations

import gc
import json

import pytest

from unsloth_med import pipeline
from unsloth_med.cli import train_command
from unsloth_med.errors import UnslothMedError
from unsloth_med.recipes import get_recipe

STAGE_KEYS = ["setup", "data", "prepare", "load_model", "eval_before", "warm_up", "train", "eval_after", "export",
              "report"]


def test_the_stage_order_is_the_documented_one():
    assert [name for name, _ in pipeline.STAGES] == ["data", "prepare", "load_model", "eval_before", "train",
                                                      "eval_after", "export", "report", "push"]


@pytest.mark.slow  # a whole tiny run with merged export: about 25 s alone, up to a minute on a busy machine
def test_a_tiny_demo_run_ends_with_a_time_breakdown_in_run_json_and_on_stdout(tmp_path, capsys):
    out = tmp_path / "run"
    frozen_before = gc.get_freeze_count()
    train_command(["--demo", "--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "4",
                   "--warm_up_shapes", "true", "--save_strategy", "no", "--output_dir", str(out)],
                  get_recipe("bone_fracture"))
    status = json.loads((out / "run.json").read_text())
    # Called in-process (not the process's own command), a run freezes none of its caller's objects
    # (collector.freeze_imports); it still records what the collector cost it.
    collected = status["garbage_collection"]
    assert gc.get_freeze_count() == frozen_before == collected["frozen_objects"], collected
    assert collected["collections"] > 0 and collected["seconds"] > 0, collected
    timings = status["timings_s"]
    assert status["complete"] is True and list(timings) == [*STAGE_KEYS, "total"]
    assert all(seconds >= 0 for seconds in timings.values()), timings
    parts = sum(timings[key] for key in STAGE_KEYS)
    assert parts == pytest.approx(timings["total"], abs=0.05), timings  # nothing the stages do goes unaccounted
    assert timings["train"] > 0 and timings["load_model"] > 0 and timings["export"] > 0
    # The warm-up stage split into its parts, which account for all of it (the shape warm-up ran: it was asked for).
    warm_up = json.loads((out / "train_stats.json").read_text())["warm_up_parts"]
    assert list(warm_up) == ["adapters", "trainer", "memory_plan", "shape_warm_up", "trainer_outside_steps"]
    assert warm_up["shape_warm_up"] > 0 and all(seconds >= 0 for seconds in warm_up.values()), warm_up
    assert sum(warm_up.values()) == pytest.approx(timings["warm_up"], abs=0.1), (warm_up, timings)
    stdout = capsys.readouterr().out
    line = next(text for text in stdout.splitlines() if text.startswith("Time: "))
    assert "load model" in line and "warm up" in line and f"total {timings['total']:.1f} s" in line
    # Two steps of the demo are not the demo: its ">= 0.8 on any machine" is not claimed for them.
    demo = next(text for text in stdout.splitlines() if text.startswith("Demo: accuracy"))
    assert "Reproducible" not in demo and "--max_steps changed here" in demo, demo


def test_a_run_that_fails_in_the_data_stage_records_its_times_and_blocks_no_rerun(tmp_path):
    out, empty = tmp_path / "run", tmp_path / "no-data"
    empty.mkdir()
    argv = ["--data_dir", str(empty), "--model", "tiny:mistral3", "--output_dir", str(out)]
    with pytest.raises(UnslothMedError, match="No class folders found"):
        train_command(argv, get_recipe("bone_fracture"))
    status = json.loads((out / "run.json").read_text())
    assert status["stage"] == "data" and not status.get("complete")
    assert list(status["timings_s"]) == ["setup", "data", "total"]
    with pytest.raises(UnslothMedError, match="No class folders found"):  # not "already holds a run"
        train_command(argv, get_recipe("bone_fracture"))


def test_a_folder_with_checkpoints_but_no_readable_run_json_is_still_protected(tmp_path):
    """run.json cut short (a full disk) or deleted: its checkpoints are still work to keep, so a run without --resume
    is refused, where before it was taken for a fresh folder (unreadable run.json: a JSONDecodeError traceback)."""
    out, empty = tmp_path / "run", tmp_path / "no-data"
    empty.mkdir()
    argv = ["--data_dir", str(empty), "--model", "tiny:mistral3", "--output_dir", str(out)]
    (out / "checkpoint-3").mkdir(parents=True)
    for run_json in ('{"stage": "tra', None):  # cut short, then gone
        if run_json is None:
            (out / "run.json").unlink()
        else:
            (out / "run.json").write_text(run_json)
        with pytest.raises(UnslothMedError, match="already holds a run. Pass --resume"):
            train_command(argv, get_recipe("bone_fracture"))
    # Without checkpoints an unreadable run.json holds nothing to lose: the run starts afresh (and stops at the data).
    (out / "checkpoint-3").rmdir()
    (out / "run.json").write_text('{"stage": "da')
    with pytest.raises(UnslothMedError, match="No class folders found"):
        train_command(argv, get_recipe("bone_fracture"))
    assert json.loads((out / "run.json").read_text())["stage"] == "data"


def test_samples_too_long_stop_the_run_after_the_model_loads_and_run_json_says_so(tmp_path):
    """Every training sample is longer than --max_seq_length 20: the run stops in its load_model stage, before the
    evaluation and any step, and run.json names that stage (it said "data" for failures in prepare and load_model)."""
    from unsloth_med.errors import SampleTooLongError

    out = tmp_path / "run"
    with pytest.raises(SampleTooLongError, match=r"training samples need more than max_seq_length=20"):
        train_command(["--demo", "--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "4",
                       "--max_seq_length", "20", "--output_dir", str(out)], get_recipe("bone_fracture"))
    status = json.loads((out / "run.json").read_text())
    assert status["stage"] == "load_model" and not status.get("complete")
    assert not (out / "eval_before.json").exists() and not (out / "train_log.jsonl").exists()


def test_a_stage_that_fails_after_timing_a_part_apart_counts_that_part_once():
    """Training times its warm-up apart, then saving the adapter fails (a full disk): the failed run's breakdown
    still adds up to its total (the warm-up was counted in both warm_up and train)."""
    import time

    def train(ctx):
        time.sleep(0.2)
        ctx.timings["warm_up"] = 0.2
        time.sleep(0.1)
        raise OSError(28, "No space left on device")

    ctx = pipeline.RunContext(get_recipe("bone_fracture"), None)
    with pytest.raises(OSError):
        pipeline._run_stage(ctx, "train", train)
    timings = ctx.breakdown()
    assert timings["warm_up"] == pytest.approx(0.2) and timings["train"] == pytest.approx(0.1, abs=0.05)
    assert timings["warm_up"] + timings["train"] == pytest.approx(timings["total"], abs=0.05), timings
