"""Every trainable parameter trains: after a few real SFT steps, each one the finetune_* flags made
trainable has changed, on each tiny family (TRL's VLM training test checks the same). A falling loss
alone would pass if, say, the vision adapters never received a gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unsloth_med.backends.hf import HFBackend
from unsloth_med.config import LoraArgs, ModelArgs, parse_config
from unsloth_med.data.synthetic import draw_fracture
from unsloth_med.models.families import family_of
from unsloth_med.models.speedups import apply_training_speedups
from unsloth_med.recipes.bone_fracture import RECIPE
from unsloth_med.train import build_trainer

FAMILY_IMAGE_SIZE = {"mistral3": 64, "mllama": 64, "qwen2_5_vl": 56}
COMBINATIONS = {  # name: (vision, language, attention, mlp)
    "vision+language": (True, True, True, True),
    "vision-only": (True, False, True, True),
    "language-only": (False, True, True, True),
    "attention-only": (True, True, True, False),
    "mlp-only": (True, True, False, True),
}


def open_cross_attention_gates(model) -> None:
    """Mllama adds the image to the text through tanh-gated cross-attention. A pretrained Llama 3.2 Vision has
    learned, open gates; the tiny random model keeps transformers' zero init (tanh(0) = 0), so no image reaches
    the text and the vision adapters get no gradient at all. Open them as a trained checkpoint has them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xrays")
    rng = np.random.default_rng(0)
    out = []
    for i, label in enumerate(RECIPE.labels[:4]):
        path = folder / f"{i}.png"
        draw_fracture(label, rng, 64).save(path)
        out.append({"image": str(path), "target": label, "id": f"row{i}"})
    return out


# The default (everything on) stays in the fast subset; the other combinations are slow (CI runs them).
@pytest.mark.parametrize("combination", [c if c == "vision+language" else pytest.param(c, marks=pytest.mark.slow)
                                         for c in COMBINATIONS])
@pytest.mark.parametrize("family", list(FAMILY_IMAGE_SIZE))
def test_every_trainable_parameter_changes(tiny_path, rows, family, combination, tmp_path):
    vision, language, attention, mlp = COMBINATIONS[combination]
    lora = LoraArgs(finetune_vision_layers=vision, finetune_language_layers=language,
                    finetune_attention_modules=attention, finetune_mlp_modules=mlp)
    backend = HFBackend()
    model, processor = backend.load(str(tiny_path(family)), ModelArgs())
    open_cross_attention_gates(model)
    model = backend.add_adapters(model, lora, ModelArgs(), seed=0)
    apply_training_speedups(model)  # as the pipeline trains: a frozen vision tower skips its backward
    fam = family_of(model.config)
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    on_vision = {name for name in trainable if fam.is_vision_module(name)}
    assert bool(on_vision) == vision and bool(set(trainable) - on_vision) == language, sorted(trainable)[:5]
    kinds = {("attention" if any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj", "attn", "qkv"))
              else "mlp") for name in trainable}
    assert ("attention" in kinds) == attention and ("mlp" in kinds) == mlp, sorted(trainable)[:5]

    collator = backend.collator(model, processor, RECIPE, image_size=FAMILY_IMAGE_SIZE[family], max_seq_length=4096)
    config = parse_config(["--output_dir", str(tmp_path), "--max_steps", "3", "--learning_rate", "1e-2",
                           "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                           "--warmup_steps", "0", "--save_strategy", "no", "--logging_steps", "1"], RECIPE)
    import datasets

    trainer = build_trainer(model, processor, datasets.Dataset.from_list(rows), collator, config.training, tmp_path)
    trainer.train()
    after = dict(model.named_parameters())
    unchanged = [name for name, before in trainable.items() if torch.equal(before, after[name].detach())]
    assert unchanged == [], f"{len(unchanged)} of {len(trainable)} trainable parameters never changed: {unchanged[:6]}"
