"""Experiment logging: `--report_to tensorboard|wandb|none` with `--run_name`, offline."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from unsloth_med.cli import generic_main as main

pytestmark = pytest.mark.slow  # whole-job runs with each logger; CI runs them

STEPS = 2


@pytest.fixture(scope="module")
def tiny_listing(tmp_path_factory):
    """A 2-class listing of small generated images (train/test given), enough for a 2-step run."""
    root = tmp_path_factory.mktemp("listing")
    lines = ["path,label,split"]
    for label, colour in (("bright", 230), ("dark", 25)):
        for i in range(4):
            path = root / f"{label}{i}.png"
            Image.new("L", (48, 48), colour).save(path)
            lines.append(f"{path.name},{label},{'test' if i == 3 else 'train'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def _run(tiny_path, listing: Path, out: Path, *extra: str) -> Path:
    tiny_path("mistral3")
    argv = ["classify", "--data_dir", str(listing), "--model", "tiny:mistral3", "--max_steps", str(STEPS),
            "--image_size", "64", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--save_strategy", "no", "--eval_before", "false", "--eval_after", "false", "--logging_steps", "1",
            "--output_dir", str(out), *extra]
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["complete"] is True
    return out


def _event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


def test_tensorboard_event_files_are_written_offline_and_read_back(tiny_path, tiny_listing, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run(tiny_path, tiny_listing, tmp_path / "tb", "--report_to", "tensorboard", "--run_name", "tb-smoke")
    files = _event_files(out)
    assert files, f"no TensorBoard event file under {out}"
    accumulator = EventAccumulator(str(files[0].parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    assert all(math.isfinite(e.value) and e.value > 0 for e in losses)
    # The same losses as the run's own log.
    logged = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert [round(e.value, 4) for e in losses] == [round(v, 4) for v in logged]
    # The run name reaches the resolved config (and the trainer's arguments written to TensorBoard).
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["run_name"] == "tb-smoke"


def test_report_to_none_writes_no_event_files(tiny_path, tiny_listing, tmp_path):
    out = _run(tiny_path, tiny_listing, tmp_path / "none", "--report_to", "none")
    assert _event_files(out) == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_mode_needs_no_network(tiny_path, tiny_listing, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_PROJECT", "unsloth-med-tests")
    (tmp_path / "wandb-dir").mkdir()
    _run(tiny_path, tiny_listing, tmp_path / "wb", "--report_to", "wandb", "--run_name", "wandb-smoke")
    runs = sorted((tmp_path / "wandb-dir").rglob("offline-run-*"))
    assert runs, "no offline W&B run folder was written"
    assert any(p.suffix == ".wandb" for p in runs[0].rglob("*"))
