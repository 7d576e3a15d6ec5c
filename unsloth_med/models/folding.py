"""Evaluation with every LoRA adapter folded into one 16-bit weight per layer, for the length of a block.

Unfolded, each adapted linear layer runs its base matmul (4-bit weights dequantized on every call), then x @ A,
then @ B, scaled and added. On the 14B shape after training that made each label-scoring batch about 20% slower
than with the adapters folded (side by side on an H200: benchmarks/README.md, session 14). Folded, a layer is one
matmul with W = dequantized base + scaling * B @ A: the sum Unsloth's merged 16-bit export writes, so the scores are
those of the merged model a user ships. The sum is taken in float32, then rounded to the layer's 16-bit dtype once.

It costs a 16-bit copy of every adapted layer (about 24 GiB for the 14B's language model) while the block runs:
folded only when that copy is at most half of the memory the budget leaves free, and freed when the block ends. If
the GPU runs out of memory while folding anyway, the folded layers are put back and evaluation runs unfolded.
Not folded: DoRA and other LoRA variants, adapters with their own bias, layers that are not linear, merged layers.

`dequantize` extends the same to the 4-bit layers without a folded adapter: each runs on its weight dequantized once
for the block, which is what bitsandbytes computes on every call with more than one row. Meant for generation, where
every decoding step would dequantize every weight again: on an H200 the 11B shape's base model generated 1.42x the
tokens/s, and label scoring gained nothing (benchmarks/README.md, session 17); evaluate() asks for it when a pass
generates. Where the adapters' folded weights fit the memory rule but those and the dequantized copies together do
not, only the adapters are folded (`dequantize_skipped` in the record says why).
"""
from __future__ import annotations

import logging
import os
import time
import types
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


def free_memory_bytes(device) -> int:
    """Bytes this process may still allocate on `device`: the GPU's free memory, capped by a memory budget set
    with torch.cuda.set_per_process_memory_fraction; on a CPU, the available RAM."""
    if getattr(device, "type", str(device)) != "cuda":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 0
    free, total = torch.cuda.mem_get_info(device)
    share = getattr(torch.cuda, "get_per_process_memory_fraction", lambda *_: 1.0)(device)  # a memory budget's cap
    return int(min(free, share * total - torch.cuda.memory_allocated(device)))


def _adapters(layer) -> list[str] | None:
    """The active adapters of a peft LoRA layer when folding gives its output exactly; None when it cannot."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    base = layer.get_base_layer()
    if not isinstance(base, torch.nn.Linear):
        return None
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    variants = getattr(layer, "lora_variant", {}) or {}
    if any(getattr(layer, "use_dora", {}).get(a) or variants.get(a) is not None
           or getattr(layer.lora_B[a], "bias", None) is not None for a in names):
        return None
    return names


def foldable_layers(model) -> list:
    """(layer, its adapters) for every peft LoRA layer of `model` that can be folded."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: nothing to fold
        return []
    found = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module):
            names = _adapters(module)
            if names:
                found.append((module, names))
    return found


def _is_4bit(module) -> bool:
    """A bitsandbytes 4-bit linear layer (its weight dequantized on every call). Not peft's LoRA wrapper of one:
    it shares the class name and, through a property, the weight, and taking it for a plain layer would patch the
    wrapper's folded forward over with its base weight alone, dropping the adapter (seen on an H200, session 17)."""
    cls = type(module)
    return (cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
            and getattr(module.weight, "quant_state", None) is not None)


def quantized_layers(model, folded: list = ()) -> list:
    """(layer, []) for every 4-bit linear layer of `model` but the base layers of `folded` (foldable_layers' LoRA
    layers, whose fold dequantizes them already)."""
    bases = {id(layer.get_base_layer()) for layer, _ in folded}
    return [(m, []) for m in model.modules() if _is_4bit(m) and id(m) not in bases]


def _base(layer, names: list[str]):
    """The linear layer whose weight is folded: a LoRA layer's base layer; a plain 4-bit layer (no adapter names)
    itself."""
    return layer.get_base_layer() if names else layer


def _folded_weight(layer, names: list[str]) -> torch.Tensor:
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(_base(layer, names))
    dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    if not names:  # a plain 4-bit layer: its weight as every call dequantizes it
        return weight.to(dtype)
    total = weight.float()
    for name in names:
        total = total + layer.get_delta_weight(name).float().to(total.device)
    return total.to(dtype)


def _fold_size(layers) -> int:
    """Bytes of the folded copies: 16-bit on a GPU (the compute dtype); a float32 model on a CPU keeps float32."""
    bases = [_base(layer, names) for layer, names in layers]
    return sum(b.in_features * b.out_features * (4 if b.weight.dtype == torch.float32 else 2) for b in bases)


@contextmanager
def folded_adapters(model, enabled: bool = True, *, dequantize: bool = False):
    """Within the block, every foldable LoRA layer of `model` computes x @ (W + scaling * B @ A) in one matmul
    (unless `enabled` is False); with `dequantize`, every other 4-bit linear layer runs on its weight dequantized
    once (quantized_layers), instead of dequantizing it again on every call.

    Yields a record for evaluation's JSON: {"layers", "gib", "seconds"} (and "dequantized_layers") when folded,
    else {"layers": 0, "reason"}. Each layer's own forward is back, and the folded weights freed, when the block
    ends."""
    lora = foldable_layers(model) if enabled else []
    plain = quantized_layers(model, lora) if dequantize else []
    layers = lora + plain
    if not layers:
        yield {"layers": 0, "reason": ("disabled" if not enabled else "no LoRA adapters to fold")
               + (" and no 4-bit layers" if dequantize else "")}
        return
    size = _fold_size(layers)
    device = _base(*layers[0]).weight.device
    free = free_memory_bytes(device)
    skipped = None
    if size > free // 2 and lora and plain and _fold_size(lora) <= free // 2:
        # The fold is the larger gain (generation after training: 395 against 174 tokens/s on the 11B shape): keep
        # it, and leave the other 4-bit layers as they are, rather than doing neither.
        skipped = (f"the dequantized copies of the other {len(plain)} 4-bit layers ({_fold_size(plain) / 2**30:.1f} "
                   f"GiB) do not also fit in half of the {free / 2**30:.1f} GiB free: they run 4-bit")
        log.info("Evaluation folds the adapters only: %s.", skipped)
        plain, layers, size = [], lora, _fold_size(lora)
    if size > free // 2:
        reason = (f"the folded weights ({size / 2**30:.1f} GiB) would take more than half of the "
                  f"{free / 2**30:.1f} GiB free in the memory budget")
        log.info("Evaluation runs the adapters unfolded: %s.", reason)
        yield {"layers": 0, "reason": reason}
        return
    started = time.perf_counter()
    saved: list = []
    try:
        try:
            with torch.no_grad():
                for layer, names in layers:
                    weight = _folded_weight(layer, names)
                    base = _base(layer, names)
                    bias = None if base.bias is None else base.bias.detach().to(weight.dtype)
                    previous = layer.__dict__.get("forward")  # another patch's forward, put back after
                    saved.append((layer, previous))
                    layer.forward = _one_matmul(previous or types.MethodType(type(layer).forward, layer), weight, bias)
            record = {"layers": len(lora), "gib": round(size / 2**30, 2),
                      "seconds": round(time.perf_counter() - started, 2)}
            if dequantize:
                record["dequantized_layers"] = len(plain)
            if skipped:
                record["dequantize_skipped"] = skipped
        except torch.cuda.OutOfMemoryError:  # the estimate missed (fragmentation, another process): score unfolded
            record = {"layers": 0, "reason": f"out of GPU memory after folding {len(saved)} of {len(layers)} layers"}
            _restore(saved)
            torch.cuda.empty_cache()
            log.warning("Evaluation runs the adapters unfolded: %s.", record["reason"])
        yield record
    finally:
        _restore(saved)


def _restore(saved: list) -> None:
    """Each layer's own forward back (the folded weights go with the closures that held them)."""
    while saved:
        layer, previous = saved.pop()
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous


def _one_matmul(unfolded, weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:  # peft's per-row adapter choice: not what was folded
            return unfolded(x, *args, **kwargs)
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return forward
