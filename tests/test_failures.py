"""Failures with a way out: over-long samples, out-of-memory advice, interrupted checkpoints."""
from __future__ import annotations

import glob

import pytest

from unsloth_med.backends.hf import HFBackend
from unsloth_med.config import ModelArgs, parse_config
from unsloth_med.errors import SampleTooLongError
from unsloth_med.pipeline import out_of_memory_error
from unsloth_med.recipes.bone_fracture import RECIPE
from unsloth_med.train import last_checkpoint


def test_a_sample_longer_than_max_seq_length_is_named_never_truncated(tiny_path, bone_break_dir):
    model, processor = HFBackend().load(str(tiny_path("mistral3")), ModelArgs())
    image = sorted(glob.glob(str(bone_break_dir / "**" / "*.jpg"), recursive=True))[0]
    collator = HFBackend().collator(model, processor, RECIPE, image_size=64, max_seq_length=40)
    with pytest.raises(SampleTooLongError, match=r"Sample xray-7 needs \d+ tokens .* max_seq_length=40.*--image_size"):
        collator([{"image": image, "target": "Spiral Fracture", "id": "xray-7"}])


def test_out_of_memory_names_the_knobs_and_the_checkpoint(tmp_path):
    config = parse_config(["--output_dir", str(tmp_path), "--image_size", "512"], RECIPE)
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text("{}")
    message = str(out_of_memory_error(config, tmp_path))
    for knob in ("--image_size (now 512", "--per_device_train_batch_size (now 2", "--gradient_accumulation_steps",
                 "--load_in_4bit", "--finetune_vision_layers false", "--resume"):
        assert knob in message, knob
    assert "checkpoint-40" in message


def test_an_interrupted_checkpoint_is_never_resumed_from(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):  # checkpoint-30 was cut off mid-write
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert last_checkpoint(tmp_path / "missing") is None
