"""Two changes to how a vision tower runs in training, found by profiling a 14B step on an H100.

1. `batch_same_size_images`: the Pixtral vision tower (Mistral 3 / Ministral 3) puts all the patches
   of a batch into ONE sequence and separates the images with a block-diagonal attention mask, so its
   attention costs (images x patches)^2 instead of images x patches^2: with 16 images of 504 px
   (1,296 patches each) the vision attention was 28% of the whole training step. When every image
   of a batch has the same size (image buckets + length grouping make that the rule), the tower can
   run them as a real batch, one sequence per image, with no mask; a batch of mixed sizes runs as one
   such batch per size. Exactly the same arithmetic per image as the original.
2. `skip_frozen_vision_backward`: with the vision tower frozen (--finetune_vision_layers false), no
   gradient is needed inside it, yet the trainer's input-gradient hooks make autograd run its backward
   (and, with gradient checkpointing, its forward a second time). Detaching the tower's output when
   none of its parameters trains skips both; LoRA gradients are unchanged.
"""
from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


def _pixtral_towers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "PixtralVisionModel"]


def batch_same_size_images(model) -> int:
    """Run each same-size group of a batch's images through Pixtral vision towers as a batch;
    returns how many towers."""
    towers = _pixtral_towers(model)
    for tower in towers:
        if getattr(tower, "_unsloth_med_batched", False):
            continue
        original = tower.forward
        tower.forward = types.MethodType(_make_batched_forward(original), tower)
        tower._unsloth_med_run_group = types.MethodType(_run_group, tower)
        tower._unsloth_med_batched = True
    return len(towers)


def _make_batched_forward(original):
    def forward(self, pixel_values, image_sizes=None, output_hidden_states=None, **kwargs):
        attn = getattr(self.config, "_attn_implementation", "sdpa") or "sdpa"
        if image_sizes is None or "flash" in attn or kwargs.get("return_dict") is False:
            return original(pixel_values, image_sizes=image_sizes, output_hidden_states=output_hidden_states, **kwargs)
        from transformers.modeling_outputs import BaseModelOutput

        sizes = [tuple(int(x) for x in s) for s in image_sizes]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        # Each same-size group runs as a batch (one sequence per image, no mask); per image we keep
        # every layer's (patches, hidden) output, then put the images back in their original order.
        per_image: list[list[torch.Tensor] | None] = [None] * len(sizes)
        for size, members in groups.items():
            layers_out = self._unsloth_med_run_group(pixel_values[members], size, kwargs)
            for j, i in enumerate(members):
                per_image[i] = [h[j] for h in layers_out]
        collected = [torch.cat([per_image[i][k] for i in range(len(sizes))], dim=0).unsqueeze(0)
                     for k in range(len(per_image[0]))]
        want_hidden = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return BaseModelOutput(last_hidden_state=collected[-1], hidden_states=tuple(collected) if want_hidden else None)

    return forward


def _run_group(self, pixel_values, size, kwargs) -> list[torch.Tensor]:
    """Images of one size through the tower as a batch: [embeddings, layer 1, ..., layer N],
    each (n, patches, hidden)."""
    rows, cols = size[0] // self.patch_size, size[1] // self.patch_size
    embeds = self.patch_conv(pixel_values.to(dtype=self.patch_conv.weight.dtype))[..., :rows, :cols]
    embeds = self.ln_pre(embeds.flatten(2).transpose(1, 2))
    grid = torch.meshgrid(torch.arange(rows, device=embeds.device), torch.arange(cols, device=embeds.device),
                          indexing="ij")
    position_ids = torch.stack([grid[0].flatten(), grid[1].flatten()], dim=-1)
    position_embeddings = self.patch_positional_embedding(embeds, position_ids)
    hidden, collected = embeds, [embeds]
    for layer in self.transformer.layers:
        hidden = layer(hidden, None, position_embeddings=position_embeddings, **kwargs)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        collected.append(hidden)
    return collected


def skip_frozen_vision_backward(model) -> bool:
    """Detach the vision tower's output while none of its parameters trains.

    Returns whether the backward through the tower is skipped: False when the tower trains (adapters on it,
    or a full fine-tune), as the hook then passes its output through untouched. Call it after the adapters
    are added, so train_stats.json records what the run does."""
    tower = _vision_tower(model)
    if tower is None:
        return False
    if getattr(tower, "_unsloth_med_detach_hook", None) is None:
        tower._unsloth_med_detach_hook = tower.register_forward_hook(_detach_when_frozen)
    return not any(p.requires_grad for p in tower.parameters())


def _detach_when_frozen(module, args, output):
    if any(p.requires_grad for p in module.parameters()):  # checked per call: freezing can change after setup
        return output
    return _detached(output)


def _vision_tower(model):
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("vision_tower", "vision_model", "visual") and any(True for _ in module.parameters()):
            return module
    return None


def _detached(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return type(output)(_detached(o) for o in output)
    if hasattr(output, "keys"):  # a ModelOutput
        for key in list(output.keys()):
            output[key] = _detached(output[key])
        return output
    return output


def decoder_layers(model, part: str) -> list:
    """The checkpointable transformer layers of the language model ("language") or the vision tower ("vision")."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    tower = _vision_tower(model)
    in_tower = {id(m) for m in tower.modules()} if tower is not None else set()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return [m for m in layers if (id(m) in in_tower) == (part == "vision")]


def checkpointed_layers(model) -> dict:
    """How many language and vision layers recompute their forward in the backward (gradient checkpointing)."""
    return {part: f"{sum(bool(getattr(m, 'gradient_checkpointing', False)) for m in layers)}/{len(layers)}"
            for part in ("language", "vision") for layers in [decoder_layers(model, part)]}


def checkpoint_fewer_layers(model, unchecked: int) -> int:
    """Keep the activations of the last `unchecked` language layers instead of recomputing them.

    Checkpointing trades memory for a second forward of every layer: a third of a LoRA step's arithmetic.
    Where memory is left over under the cap, each layer taken out of checkpointing saves its recompute
    and costs its activations. transformers checks each layer's own `gradient_checkpointing` flag
    (GradientCheckpointingLayer), so turning it off per layer is all it takes. Returns how many were turned off.
    """
    layers = [m for m in decoder_layers(model, "language") if getattr(m, "gradient_checkpointing", False)]
    for layer in layers[max(0, len(layers) - unchecked):] if unchecked > 0 else []:
        layer.gradient_checkpointing = False
    return min(max(unchecked, 0), len(layers))


def apply_training_speedups(model) -> dict:
    """Both changes, where they apply; returns what was done (for train_stats.json)."""
    done = {"batched_same_size_vision": batch_same_size_images(model),
            "frozen_vision_backward_skipped": skip_frozen_vision_backward(model)}
    log.info("training speedups: %s", done)
    return done
