"""--resume continues the run as it was configured (its config.yaml), refuses what its checkpoints cannot change,
never keeps the earlier run's completion, and never pushes an export of an earlier adapter; YAML values get the
checks flags get. Real runs of `python -m unsloth_med.recipes.generic classify` on a tiny model, in this process (the
Ctrl-C one in a process of its own)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

# 3 classes x 4 images of 32 px, one of each class held out by the listing's split column.
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}
FAST = ["--model", "tiny:mistral3", "--image_size", "32", "--eval_before", "false", "--eval_after", "false",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_total_limit", "3",
        "--seed", "5"]


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("listing")
    rows = ["path,label,split"]
    for label, colour in COLOURS.items():
        for i in range(4):
            path = root / "img" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), tuple(min(255, c + 12 * i) for c in colour)).save(path)
            rows.append(f"img/{label}/{i}.png,{label},{'test' if i == 0 else 'train'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def _classify(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`python -m unsloth_med.recipes.generic classify ARGV` in this process: its own entry and error handling."""
    from unsloth_med.cli import generic_main

    capsys.readouterr()
    code = generic_main(["classify", *argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def _saved_steps(run_dir: Path) -> list[int]:
    return [int(p.parent.name.split("-")[-1]) for p in run_dir.glob("checkpoint-*/trainer_state.json")]


def _interrupted_after(run_dir: Path, step: int, *argv: str) -> subprocess.CompletedProcess:
    """`python -m unsloth_med.recipes.generic classify ARGV`, stopped by a real Ctrl-C (SIGINT) once a checkpoint of
    `step` or later is saved. A process of its own, watched from this one: a watcher thread beside an in-process run
    twice let the run finish in CI (exit 0 where 130 was due), and save_total_limit removes checkpoint-`step` a few
    steps on, so any later checkpoint will do."""
    out_file, err_file = run_dir.parent / "interrupted.out", run_dir.parent / "interrupted.err"  # never a full pipe
    with out_file.open("w") as out, err_file.open("w") as err:
        # SIGINT back to its default in the child, which Python then turns into KeyboardInterrupt: a test process
        # started in the background by a shell (`make test &`, a CI runner's job) ignores SIGINT, and the child
        # would inherit that, ignore the Ctrl-C and finish its run.
        process = subprocess.Popen([sys.executable, "-m", "unsloth_med.recipes.generic", "classify", *argv],
                                   stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 600
            while not any(s >= step for s in _saved_steps(run_dir)):
                assert process.poll() is None, f"the run ended before checkpoint {step}: {err_file.read_text()[-3000:]}"
                assert time.time() < deadline, f"no checkpoint {step} within 600 s"
                time.sleep(0.1)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    steps = sorted(_saved_steps(run_dir))  # where the signal found the run, for a failure's message
    return subprocess.CompletedProcess(argv, process.returncode, out_file.read_text(),
                                       err_file.read_text() + f"\n[test] checkpoints after the signal: {steps}")


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _saved(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(listing, tmp_path_factory) -> Path:
    """A finished 2-step run with lora_r 8 and checkpoint-2 (read only; tests that resume copy it)."""
    from unsloth_med.cli import generic_main

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    code = generic_main(["classify", "--data_dir", str(listing), "--output_dir", str(run_dir), *FAST,
                         "--max_steps", "2", "--save_steps", "2", "--lora_r", "8", "--lora_alpha", "8"])
    assert code == 0 and _status(run_dir)["complete"] is True
    return run_dir


def test_resume_continues_with_the_runs_own_settings_and_never_keeps_the_old_completion(listing, tmp_path, capsys):
    run_dir = tmp_path / "run"
    settings = tmp_path / "settings.yaml"  # passed as --config=FILE: that form is read too
    settings.write_text(yaml.safe_dump({"training": {"max_steps": 6, "save_steps": 2, "learning_rate": 1e-3},
                                        "lora": {"lora_r": 8, "lora_alpha": 8}}))
    first = _classify(capsys, "--data_dir", str(listing), "--output_dir", str(run_dir), *FAST, f"--config={settings}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _state(run_dir / "checkpoint-6")["global_step"] == 6 and _status(run_dir)["complete"] is True
    assert "report" in _status(run_dir)["timings_s"]

    # Resumed to train longer (the flag wins over the saved max_steps; the same model named as the user named it is
    # no change), then Ctrl-C after checkpoint-8: run.json no longer claims the earlier run's completion or times.
    stopped = _interrupted_after(run_dir, 8,
                                 "--resume", "--output_dir", str(run_dir), "--max_steps", "30",
                                 "--model", "tiny:mistral3")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "--resume continues from its last checkpoint" in stopped.stderr, stopped.stderr[-3000:]
    status = _status(run_dir)
    assert status["stage"] == "train" and status["complete"] is False
    assert "wall_seconds" not in status and "report" not in status.get("timings_s", {})
    saved = _saved(run_dir)
    assert saved["training"]["max_steps"] == 30 and saved["training"]["learning_rate"] == 1e-3
    assert saved["lora"]["lora_r"] == 8 and saved["data"]["image_size"] == 32

    # What the interrupted message says, exactly: --resume --output_dir DIR, nothing else repeated.
    from unsloth_med.train import last_checkpoint

    resumed_from = int(Path(last_checkpoint(run_dir)).name.split("-")[-1])
    resumed = _classify(capsys, "--resume", "--output_dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert resumed_from >= 8 and steps[0] == f"{resumed_from + 1}/30", steps  # continued, not retrained
    state = _state(run_dir / "checkpoint-30")
    assert state["global_step"] == 30
    logged = {h["step"]: h["learning_rate"] for h in state["log_history"] if "learning_rate" in h}
    # Step 20 trains at the linear decay from 1e-3 after 5 warm-up steps (the default 2e-4 would be a fifth of it).
    assert logged[20] == pytest.approx(1e-3 * (30 - 19) / (30 - 5), rel=0.02)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    saved = _saved(run_dir)
    training = saved["training"]
    assert (training["max_steps"], training["learning_rate"], saved["lora"]["lora_r"]) == (30, 1e-3, 8)
    assert saved["training"]["seed"] == 5 and saved["run"]["resume"] is True
    assert _status(run_dir)["complete"] is True


def test_resume_refuses_what_its_checkpoints_are_made_of(trained, listing, tmp_path, capsys):
    before = _hashes(trained)
    other = tmp_path / "other.yaml"
    other.write_text("lora: {lora_r: 4}\n")
    for argv, said in ((["--lora_r", "16"], "--lora_r 16: the run being resumed was trained with lora_r 8"),
                       (["--no_finetune_vision_layers"], "--finetune_vision_layers false: the run being resumed was "
                                                         "trained with finetune_vision_layers true"),
                       (["--model", "someone/another-model"], "--model someone/another-model: the run being resumed "
                                                              "was trained with model "),
                       ([f"--config={other}"], f"{other} (lora_r: 4): the run being resumed was trained with "
                                               "lora_r 8")):
        refused = _classify(capsys, "--resume", "--output_dir", str(trained), *argv)
        assert refused.returncode == 2, refused.stderr[-3000:]
        message = refused.stderr.strip().splitlines()[-1]
        assert said in message and str(trained / "config.yaml") in message, message
        assert "another --output_dir" in message and "Traceback" not in refused.stderr

    # Another recipe's module on the folder.
    from unsloth_med.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "--recipe", "bone_fracture", "--resume", "--output_dir", str(trained)])
    assert exited.value.code == 2
    assert "is a 'classify' run" in capsys.readouterr().err
    assert _hashes(trained) == before  # refused before anything was written

    # --resume without a folder to resume.
    refused = _classify(capsys, "--resume", "--data_dir", str(listing))
    assert refused.returncode == 2 and "--resume --output_dir" in refused.stderr


def test_yaml_values_get_the_choice_check_a_flag_gets(listing, tmp_path, capsys):
    for section, name, bad in (("export", "export", "merged"), ("eval", "eval_mode", "generat")):
        flag = _classify(capsys, "--data_dir", str(listing), "--output_dir", str(tmp_path / "flag"), *FAST,
                         f"--{name}", bad)
        flag_error = flag.stderr.strip().splitlines()[-1]
        assert flag.returncode == 2 and f"argument --{name}" in flag_error and f"invalid choice: '{bad}'" in flag_error
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({section: {name: bad}}))
        for given in (["--config", str(path)], [f"--config={path}"]):
            from_file = _classify(capsys, "--data_dir", str(listing), "--output_dir", str(tmp_path / "run"), *FAST,
                                  *given)
            assert from_file.returncode == 2, from_file.stderr[-3000:]
            assert from_file.stderr.strip().splitlines()[-1] == f"{flag_error}, set in {path}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "flag").exists()  # refused before the run started


def test_the_push_takes_no_export_of_an_earlier_adapter(trained, tmp_path, capsys):
    """A merged/ exported at step 2 is not this run's model once training resumes to step 4: it is moved aside
    (kept), and the push uploads the run's own export. The Hub is offline here (conftest): the push's error names
    the folder it would have uploaded."""
    from unsloth_med.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    with pytest.raises(SystemExit) as exited:
        main(["export", str(run_dir), "--format", "merged-16bit"])
    assert exited.value.code == 0
    step_2 = _hashes(run_dir / "merged")

    pushed = _classify(capsys, "--resume", "--output_dir", str(run_dir), "--max_steps", "4",
                       "--push_to_hub_id", "someone/x")
    assert pushed.returncode == 2 and "HF_HUB_OFFLINE is set" in pushed.stderr, pushed.stderr[-3000:]
    assert f"saved locally in {run_dir / 'adapter-export'}" in pushed.stderr  # the adapter this run trained
    assert _state(run_dir / "checkpoint-4")["global_step"] == 4 and _status(run_dir)["complete"] is True
    assert not (run_dir / "merged").exists()  # a GGUF export would otherwise convert the step-2 weights
    [aside] = run_dir.glob("merged-superseded-*")
    assert _hashes(aside) == step_2 and f"moved to {aside}" in (run_dir / "run.log").read_text()

    # This run's own merged export is what it pushes.
    pushed = _classify(capsys, "--resume", "--output_dir", str(run_dir), "--max_steps", "5", "--save_steps", "1",
                       "--export", "merged-16bit", "--push_to_hub_id", "someone/x")
    assert pushed.returncode == 2 and f"saved locally in {run_dir / 'merged'}" in pushed.stderr, pushed.stderr[-3000:]
    assert json.loads((run_dir / "merged" / "export.json").read_text())["verification"]["passed"]


def test_the_push_uploads_what_the_runs_export_stage_wrote(tmp_path):
    from unsloth_med.pipeline import folder_to_push

    (tmp_path / "merged").mkdir()
    assert folder_to_push(tmp_path, "merged-16bit", merged_now=False) is None  # an earlier export: the adapter
    assert folder_to_push(tmp_path, "merged-16bit", merged_now=True) == tmp_path / "merged"
    (tmp_path / "gguf").mkdir()
    assert folder_to_push(tmp_path, "gguf", merged_now=True) == tmp_path / "gguf"  # --export gguf: the GGUF files
    assert folder_to_push(tmp_path, "merged-16bit", merged_now=True) == tmp_path / "merged"


def test_resume_refuses_what_its_test_split_is_made_of(trained, listing, tmp_path, caplog):
    """--resume took another --data_dir, --split_by, --test_fraction, --split_column or --seed without a word: the
    split was made again with them, and images the run was tested on went into training. The same data named by
    another path is no change; data whose recorded folder is gone (moved, another machine) is taken with a warning."""
    import logging
    import os

    from unsloth_med.config import parse_config
    from unsloth_med.errors import ConfigError
    from unsloth_med.recipes import get_recipe

    recipe = get_recipe("classify")
    other = tmp_path / "other.csv"
    other.write_text(listing.read_text())
    for argv, said in ((["--data_dir", str(other)], f"--data_dir {other}: the run being resumed was trained with "
                                                    f"data_dir {listing} "),
                       (["--split_by", "image"], "--split_by image: the run being resumed was trained with split_by "
                                                 "row "),
                       (["--test_fraction", "0.3"], "trained with test_fraction 0.1 "),
                       (["--split_column", ""], "--split_column '': the run being resumed was trained with "
                                                "split_column split "),
                       (["--seed", "7"], "--seed 7: the run being resumed was trained with seed 5 ")):
        with pytest.raises(ConfigError) as refused:
            parse_config(["--resume", "--output_dir", str(trained), *argv], recipe)
        message = str(refused.value)
        assert said in message and "images the run was tested on go into training" in message, message
        assert str(trained / "config.yaml") in message and "another --output_dir" in message, message

    linked = tmp_path / "linked.csv"
    os.symlink(listing, linked)
    config = parse_config(["--resume", "--output_dir", str(trained), "--data_dir", str(linked)], recipe)
    assert config.data.data_dir == str(linked)

    moved = tmp_path / "moved"
    moved.mkdir()
    saved = _saved(trained)
    saved["data"]["data_dir"] = str(tmp_path / "gone" / "labels.csv")
    (moved / "config.yaml").write_text(yaml.safe_dump(saved))
    with caplog.at_level(logging.WARNING, logger="unsloth_med"):
        config = parse_config(["--resume", "--output_dir", str(moved), "--data_dir", str(listing)], recipe)
    assert config.data.data_dir == str(listing) and "which is not here; continuing on --data_dir" in caplog.text
