"""Collator labels, a few real SFTTrainer steps, and adapter save/reload, on tiny real-architecture models."""
from __future__ import annotations

import glob

import pytest
import torch

from unsloth_med.backends.hf import HFBackend
from unsloth_med.config import LoraArgs, ModelArgs, parse_config
from unsloth_med.models import prompting
from unsloth_med.models.families import family_of
from unsloth_med.recipes.bone_fracture import RECIPE
from unsloth_med.train import build_trainer

IMAGE_SIZE = 128


@pytest.fixture(scope="module")
def rows(bone_break_dir):
    pattern = str(bone_break_dir / "Bone Break Classification" / "Bone Break Classification" / "{}" / "Train" / "*.jpg")
    picks = ["Avulsion fracture", "Spiral Fracture", "Oblique fracture", "Hairline Fracture"]
    return [{"image": sorted(glob.glob(pattern.format(label)))[0], "target": label, "id": f"row{i}"}
            for i, label in enumerate(picks)]


def _load(tiny_path, family):
    return HFBackend().load(str(tiny_path(family)), ModelArgs())


@pytest.mark.parametrize("family", ["mistral3", "mllama", "qwen2_5_vl"])
def test_labels_cover_exactly_the_answer(tiny_path, rows, family):
    model, processor = _load(tiny_path, family)
    fam = family_of(model.config)
    batch = HFBackend().collator(model, processor, RECIPE, image_size=IMAGE_SIZE, max_seq_length=4096)(rows)
    for i, row in enumerate(rows):
        # Independent reference: the answer starts right after the prompt rendered on its own.
        from unsloth_med.data.images import load_image

        prompt_text = prompting.render(processor, RECIPE.prompt(), add_generation_prompt=True)
        prompt_len = prompting.encode(processor, [prompt_text],
                                      [load_image(row["image"], IMAGE_SIZE)])["input_ids"].shape[1]
        answer = prompting.answer_ids(processor, fam, row["target"])
        labelled = (batch["labels"][i] != -100).nonzero().flatten().tolist()
        assert labelled == list(range(prompt_len, prompt_len + len(answer)))
        assert batch["labels"][i, labelled].tolist() == answer
        decoded = processor.tokenizer.decode(batch["input_ids"][i, labelled])
        assert decoded == row["target"] + fam.response_end


def _fixed_batch_loss(model, batch):
    model.eval()
    with torch.no_grad():
        loss = float(model(**batch).loss)
    model.train()
    return loss


@pytest.mark.parametrize("family", ["mistral3", "mllama"])
def test_a_few_sft_steps_lower_the_loss(tiny_path, rows, family, tmp_path):
    import datasets

    backend = HFBackend()
    model, processor = _load(tiny_path, family)
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    collator = backend.collator(model, processor, RECIPE, image_size=IMAGE_SIZE, max_seq_length=4096)
    fixed = collator(rows)
    before = _fixed_batch_loss(model, fixed)
    config = parse_config(["--output_dir", str(tmp_path), "--max_steps", "20", "--learning_rate", "5e-3",
                           "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                           "--warmup_steps", "0", "--save_strategy", "no"], RECIPE)
    trainer = build_trainer(model, processor, datasets.Dataset.from_list(rows), collator, config.training, tmp_path)
    trainer.train()
    after = _fixed_batch_loss(model, fixed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and all(loss == loss for loss in losses)
    assert after < 0.8 * before, (before, after)  # LoRA on a random tiny model: a clear, not a total, drop
    assert (tmp_path / "train_log.jsonl").read_text().count('"loss"') == 20


def test_saved_adapter_reloads_and_reproduces_logits(tiny_path, rows, tmp_path):
    backend = HFBackend()
    model, processor = _load(tiny_path, "mistral3")
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    with torch.no_grad():  # make the adapter matter: LoRA B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = backend.collator(model, processor, RECIPE, image_size=IMAGE_SIZE, max_seq_length=4096)(rows)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    processor.save_pretrained(tmp_path / "adapter")
    reloaded, _ = backend.load_adapter(str(tiny_path("mistral3")), tmp_path / "adapter", ModelArgs())
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    base, _ = _load(tiny_path, "mistral3")
    with torch.no_grad():
        base_logits = base.eval()(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter really changed the outputs
