"""Backend choice on a machine without a GPU, and the unsloth backend's CPU-testable parts.

`--backend unsloth` without CUDA must stop with one clear message that suggests `--backend hf`;
`--backend auto` must pick hf. The unsloth module must be importable everywhere without importing
unsloth itself (which refuses to start without a GPU).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from unsloth_med.backends import pick_backend, resolve_backend_name
from unsloth_med.errors import BackendError, SampleTooLongError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_unsloth_without_gpu_is_a_clear_error_suggesting_hf(no_cuda):
    with pytest.raises(BackendError) as info:
        resolve_backend_name("unsloth")
    message = str(info.value)
    assert "--backend hf" in message and "GPU" in message


def test_auto_picks_hf_without_gpu(no_cuda):
    from unsloth_med.backends.hf import HFBackend

    assert resolve_backend_name("auto") == "hf"
    assert isinstance(pick_backend("auto"), HFBackend)


def test_unknown_backend_names_the_choices():
    with pytest.raises(BackendError, match="auto, unsloth or hf"):
        resolve_backend_name("vllm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_backend_unsloth_on_cpu_exits_2_with_the_hint(tmp_path):
    """The real command line: one line on stderr, exit status 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "unsloth_med.recipes.bone_fracture", "--backend", "unsloth",
         "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--backend hf" in proc.stderr and "Traceback" not in proc.stderr


def test_unsloth_module_imports_without_importing_unsloth():
    code = ("import sys, unsloth_med.backends.unsloth as u; "
            "assert 'unsloth' not in sys.modules and 'unsloth_zoo' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_the_backend_asked_for_is_read_from_the_flags_or_the_config_file(tmp_path):
    """The CLI imports unsloth before parsing only for a run that may use it: an hf run asked for by flag or by its
    --config file must not get transformers patched by unsloth."""
    from unsloth_med.backends.unsloth import requested_backend

    config = tmp_path / "run.yaml"
    config.write_text("model:\n  backend: hf\n")
    assert requested_backend(["--max_steps", "3"]) == "auto"
    assert requested_backend(["--backend", "hf"]) == "hf" and requested_backend(["--backend=unsloth"]) == "unsloth"
    assert requested_backend(["--config", str(config)]) == "hf"
    assert requested_backend([f"--config={config}", "--backend", "unsloth"]) == "unsloth"  # the flag wins
    assert requested_backend(["--config", str(tmp_path / "missing.yaml")]) == "auto"  # the parser reports it
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    assert requested_backend(["--config", str(tmp_path / "bad.yaml")]) == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_import_unsloth_first_does_nothing_without_gpu(no_cuda):
    from unsloth_med.backends.unsloth import import_unsloth_first

    assert import_unsloth_first(["--backend", "unsloth"]) is False
    assert import_unsloth_first(["--backend=hf"]) is False
    assert "unsloth" not in sys.modules


@pytest.mark.skipif(__import__("importlib").util.find_spec("unsloth") is not None, reason="unsloth is installed")
def test_unsloth_backend_load_without_unsloth_says_use_hf():
    from unsloth_med.backends.unsloth import UnslothBackend
    from unsloth_med.config import ModelArgs

    with pytest.raises(BackendError, match="--backend hf"):
        UnslothBackend().load("some/model", ModelArgs())


@pytest.mark.parametrize("setting,expected", [("unsloth", "unsloth"), ("true", True), ("True", True),
                                              ("false", False), (False, False), (True, True)])
def test_gradient_checkpointing_setting(setting, expected):
    from unsloth_med.backends.unsloth import gradient_checkpointing_value

    assert gradient_checkpointing_value(setting) == expected


def test_gradient_checkpointing_setting_rejects_garbage():
    from unsloth_med.backends.unsloth import gradient_checkpointing_value

    with pytest.raises(BackendError, match="use_gradient_checkpointing"):
        gradient_checkpointing_value("sometimes")


@pytest.mark.parametrize("size", [(512, 371), (371, 512), (640, 480), (30, 700), (512, 512), (20, 20)])
def test_snap_image_gives_patch_multiples_within_the_limit(size):
    from unsloth_med.data.images import snap_image

    out = snap_image(Image.new("RGB", size), 28, 512)
    assert all(side % 28 == 0 and 28 <= side <= 504 for side in out.size), out.size
    assert snap_image(out, 28, 512) is out  # already snapped: untouched


def test_image_factor_per_family():
    from types import SimpleNamespace as NS

    from unsloth_med.models.families import FAMILIES, image_factor

    pixtral = NS(model_type="mistral3", spatial_merge_size=2, vision_config=NS(patch_size=14))
    qwen = NS(model_type="qwen2_5_vl", vision_config=NS(patch_size=14, spatial_merge_size=2))
    mllama = NS(model_type="mllama", vision_config=NS(patch_size=14))
    assert image_factor(pixtral, FAMILIES["mistral3"]) == 28
    assert image_factor(qwen, FAMILIES["qwen2_5_vl"]) == 28
    assert image_factor(mllama, FAMILIES["mllama"]) == 1


class _FakeUnslothCollator:
    """Stands in for UnslothVisionDataCollator: records what it is given, returns a plausible batch."""

    def __init__(self, model, processor, **kwargs):
        self.kwargs, self.seen = kwargs, None
        self.truncation, self.max_seq_length = True, kwargs.get("max_seq_length")

    def __call__(self, examples):
        self.seen = examples
        n = len(examples)
        length = 10 + 5 * n
        return {"input_ids": torch.ones(n, length, dtype=torch.long),
                "attention_mask": torch.ones(n, length, dtype=torch.long)}


def _fake_collator(max_seq_length=100, image_size=64):
    from types import SimpleNamespace as NS

    from unsloth_med.backends.unsloth import UnslothCollator
    from unsloth_med.recipes.bone_fracture import RECIPE

    model = NS(config=NS(model_type="mistral3", spatial_merge_size=2, vision_config=NS(patch_size=14)))
    return UnslothCollator(model, processor=None, recipe=RECIPE, image_size=image_size,
                           max_seq_length=max_seq_length, collator_cls=_FakeUnslothCollator), RECIPE


def test_collator_turns_rows_into_recipe_conversations(tmp_path):
    collator, recipe = _fake_collator()
    path = tmp_path / "x.png"
    Image.new("L", (300, 200), 128).save(path)
    rows = [{"image": str(path), "target": "Spiral Fracture", "id": "a"}]
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 1
    inner = collator.inner
    assert inner.kwargs["train_on_responses_only"] is True
    assert inner.kwargs["instruction_part"] == "[INST]" and inner.kwargs["response_part"] == "[/INST]"
    assert inner.kwargs["resize"] == 64 and inner.truncation is False  # never truncate
    (example,) = inner.seen
    user, assistant = example["messages"]
    image = user["content"][0]["image"]
    assert user["content"][1]["text"] == recipe.instruction
    assert assistant["content"][0]["text"] == "Spiral Fracture"
    assert image.mode == "RGB" and max(image.size) <= 64 and all(s % 28 == 0 for s in image.size)


def test_collator_refuses_too_long_samples(tmp_path):
    collator, _ = _fake_collator(max_seq_length=12)
    path = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(SampleTooLongError, match="row-7"):
        collator([{"image": str(path), "target": "Spiral Fracture", "id": "row-7"}])
