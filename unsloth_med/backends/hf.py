"""The hf backend: transformers + peft, 4-bit through bitsandbytes on a CUDA GPU, fp32 on the CPU.

It runs everywhere (tests, the offline demo, machines without unsloth) and is the reference the
unsloth backend is compared against.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..data import samples
from ..data.images import load_image
from ..distributed import device_map
from ..errors import BackendError
from ..models import prompting
from ..models.families import Family, family_of, module_kind

log = logging.getLogger(__name__)


def lora_target_regex(model: torch.nn.Module, family: Family, lora) -> str:
    """A regex over module names that selects exactly the linear layers the finetune_* flags ask for."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lm_head" in name:
            continue
        kind = module_kind(name)
        if kind is None:
            continue
        side_ok = lora.finetune_vision_layers if family.is_vision_module(name) else lora.finetune_language_layers
        kind_ok = lora.finetune_attention_modules if kind == "attention" else lora.finetune_mlp_modules
        if side_ok and kind_ok:
            names.append(re.escape(name))
    if not names:
        raise BackendError(
            "The finetune_* flags select no layer to adapt (all of vision/language or attention/MLP are off). "
            "Turn on at least one of --finetune_vision_layers/--finetune_language_layers and one of "
            "--finetune_attention_modules/--finetune_mlp_modules."
        )
    return "^(" + "|".join(names) + ")$"


class VisionCollator:
    """Rows (one or several images, one or several turns) -> a padded batch whose labels are -100 except on
    the tokens of every assistant answer (its text and end-of-turn token)."""

    def __init__(self, processor: Any, family: Family, recipe, *, image_size: int | None, max_seq_length: int):
        self.processor, self.family, self.recipe = processor, family, recipe
        self.image_size, self.max_seq_length = image_size, max_seq_length
        self.pad_id = getattr(processor, "tokenizer", processor).pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images, conversations = [], []
        for i, row in enumerate(rows):
            refs = samples.image_refs(row)
            samples.check_image_count(self.family.name, len(refs), row.get("id", str(i)))
            images.append([load_image(ref, self.image_size) for ref in refs])
            conversations.append(self.recipe.to_conversation(row, images=images[-1]))
        texts = [prompting.render(self.processor, conversation, sample_id=row.get("id", str(i)))
                 for i, (row, conversation) in enumerate(zip(rows, conversations))]
        batch = prompting.encode(self.processor, texts, images, padding_side="right")
        labels = torch.full_like(batch["input_ids"], -100)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for i, row in enumerate(rows):
            sample_id = row.get("id", str(i))
            prompting.check_length(lengths[i], self.max_seq_length, sample_id, self.image_size)
            ids = batch["input_ids"][i].tolist()
            for start, end in prompting.assistant_spans(self.processor, self.family, conversations[i], images[i], ids,
                                                        lengths[i], sample_id):
                labels[i, start:end] = batch["input_ids"][i, start:end]
        batch["labels"] = labels
        return batch


class HFBackend:
    name = "hf"

    def load(self, model_name: str, model_args) -> tuple[Any, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        cuda = torch.cuda.is_available()
        four_bit = cuda if model_args.load_in_4bit is None else model_args.load_in_4bit
        kwargs: dict[str, Any] = {"dtype": (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported()
                                            else torch.float32)}
        if four_bit:
            if not cuda:
                raise BackendError("--load_in_4bit needs a CUDA GPU (bitsandbytes). On CPU, leave it off.")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"], llm_int8_skip_modules=["lm_head", "multi_modal_projector"])
            kwargs["device_map"] = device_map()  # this rank's own GPU (the first one without DDP)
        processor = AutoProcessor.from_pretrained(model_name)
        model = AutoModelForImageTextToText.from_pretrained(model_name, **kwargs)
        if cuda and not four_bit:
            model = model.to(f"cuda:{device_map()['']}")
        family = family_of(model.config, model_name)
        prompting.prepare_processor(processor, family)
        return model, processor

    def add_adapters(self, model, lora, model_args, seed: int):
        if model_args.full_finetune:
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        family = family_of(model.config)
        if getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = LoraConfig(
            r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.lora_bias,
            use_rslora=lora.use_rslora, target_modules=lora_target_regex(model, family, lora), task_type="CAUSAL_LM",
        )
        torch.manual_seed(lora.lora_random_state)
        return get_peft_model(model, config)

    def collator(self, model, processor, recipe, *, image_size, max_seq_length):
        return VisionCollator(processor, family_of(model.config), recipe, image_size=image_size,
                              max_seq_length=max_seq_length)

    def for_training(self, model):
        model.train()
        return model

    def for_inference(self, model):
        model.eval()
        return model

    def load_adapter(self, base_name: str, adapter_dir: str | Path, model_args):
        from peft import PeftModel

        model, processor = self.load(base_name, model_args)
        return PeftModel.from_pretrained(model, str(adapter_dir)), processor
