"""What differs between VLM families, in one table.

Everything family-specific that the rest of the package needs lives here: which `model_type` values
belong to the family, the chat template we train with, the text that opens the user turn and the
assistant turn (used to mask everything but the answer), and how to tell vision-side modules from
language-side ones when placing LoRA adapters.

The Ministral 3 template is deliberately short: the checkpoint's own template injects a long default
system prompt, and the seed tutorial found the model then ignored the image.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UnsupportedModelError

_TEXT_PARTS = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}IMAGE_TOKEN"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
)

MINISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]" + _TEXT_PARTS + "[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]" + _TEXT_PARTS + "[/INST]"
    "{% elif message['role'] == 'assistant' %}" + _TEXT_PARTS + "{{ eos_token }}"
    "{% endif %}{% endfor %}"
).replace("IMAGE_TOKEN", "[IMG]")

LLAMA32_VISION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}" + _TEXT_PARTS + "<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
).replace("IMAGE_TOKEN", "<|image|>")

QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}" + _TEXT_PARTS
    + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
).replace("IMAGE_TOKEN", "<|vision_start|><|image_pad|><|vision_end|>")

GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    + _TEXT_PARTS + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
).replace("IMAGE_TOKEN", "<start_of_image>")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    chat_template: str
    instruction_part: str  # text that opens a user turn
    response_part: str  # text that opens the assistant turn; the answer starts right after it
    response_end: str  # token that closes the answer (trained on, so the model learns to stop)
    vision_prefixes: tuple[str, ...]  # module-name parts of the vision tower and projector
    use_own_template: bool = False  # keep the checkpoint's template when it has one

    def is_vision_module(self, name: str) -> bool:
        return any(part in name for part in self.vision_prefixes)


_ATTENTION = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv|proj|out_proj|query|key|value)$")
_ATTENTION_PARENT = re.compile(r"(attn|attention|self_attn|cross_attn)")
_MLP = re.compile(r"(^|\.)(gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2|merging_layer|mlp\.0|mlp\.2)$")


def module_kind(name: str) -> str | None:
    """'attention', 'mlp' or None for a linear layer's qualified name (None: not a LoRA target)."""
    leaf_parent = name.rsplit(".", 1)[0] if "." in name else ""
    if _ATTENTION.search(name) and _ATTENTION_PARENT.search(leaf_parent):
        return "attention"
    if _MLP.search(name) or "multi_modal_projector" in name or "merger" in name:
        return "mlp"
    return None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="mistral3",
            model_types=("mistral3", "ministral3", "pixtral", "llava"),
            chat_template=MINISTRAL_TEMPLATE,
            instruction_part="[INST]",
            response_part="[/INST]",
            response_end="</s>",
            vision_prefixes=("vision_tower", "multi_modal_projector"),
        ),
        Family(
            name="mllama",
            model_types=("mllama",),
            chat_template=LLAMA32_VISION_TEMPLATE,
            instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
            response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
            response_end="<|eot_id|>",
            vision_prefixes=("vision_model", "multi_modal_projector"),
        ),
        Family(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl", "qwen2_vl"),
            chat_template=QWEN_VL_TEMPLATE,
            instruction_part="<|im_start|>user\n",
            response_part="<|im_start|>assistant\n",
            response_end="<|im_end|>",
            vision_prefixes=("visual",),
        ),
        Family(
            name="gemma3",
            model_types=("gemma3",),
            chat_template=GEMMA3_TEMPLATE,
            instruction_part="<start_of_turn>user\n",
            response_part="<start_of_turn>model\n",
            response_end="<end_of_turn>",
            vision_prefixes=("vision_tower", "multi_modal_projector"),
            use_own_template=True,
        ),
    )
}


def family_for_model_type(model_type: str, where: str = "") -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise UnsupportedModelError(
        f"Model family '{model_type}'{f' of {where}' if where else ''} is not supported. "
        f"Supported families: {known}. Pick a checkpoint of one of these families with --model."
    )


def family_of(config, where: str = "") -> Family:
    """The Family of a transformers config (or anything with .model_type)."""
    return family_for_model_type(getattr(config, "model_type", "?"), where)


def image_factor(model_config, family: Family) -> int:
    """Pixels per image token side (patch x spatial merge), or 1 where the processor tiles itself."""
    if family.name not in ("mistral3", "qwen2_5_vl"):
        return 1  # mllama tiles to 560 px, gemma3 resizes to a fixed square: no snapping needed
    vision = getattr(model_config, "vision_config", None)
    patch = getattr(vision, "patch_size", 14) or 14
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    merge = getattr(model_config, "spatial_merge_size", None) or getattr(vision, "spatial_merge_size", None) or 2
    return int(patch) * int(merge)


def image_fit(model_config, image_size, *, buckets: bool = False):
    """The ImageFit for this model: image_size (an int, or an ImageFit returned as is) on its patch grid."""
    from ..data.images import ImageFit

    if isinstance(image_size, ImageFit):
        return image_size
    return ImageFit(image_size, image_factor(model_config, family_of(model_config)), buckets)
