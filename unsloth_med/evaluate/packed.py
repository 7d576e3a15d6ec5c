"""Label scoring in one forward per batch: every class's answer tokens packed after the prompt.

The cached strategy (classify.score_encoded) runs the prompt, then copies the prompt's KV cache once per class
and runs the classes' remaining answer tokens from those copies. On the 14B shape the copies and their
concatenation were 19% of evaluation's GPU time and the second forward 30% of its wall time
(benchmarks/README.md, evaluation profile). Here the answer tokens of all classes follow the prompt in the same
sequence, and a 4-D attention mask lets each class's tokens see the prompt and the earlier tokens of their own
class only, at the positions they would have after the prompt: the same log-likelihoods, from one forward that
is a few percent longer, with no cache at all.

Only where positions and masks are the model's inputs alone, which is Mistral 3 (Pixtral), the recipes' default:
not for 3-D rotary positions derived from the image grid (Qwen2.5-VL), cross-attention masks (Mllama), image
tokens that attend both ways (Gemma 3 builds that into its own mask), or attention kernels that take no 4-D mask
(flash). Evaluation checks it on the first rows against one full sequence per class before trusting it
(check_packed), once per model and attention path: a later pass over the same model (a run's pass after training)
reuses a check that passed (passed_check / remember_check).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..models.families import Family
from .inputs import device_tensor, model_device_dtype, to_model

#: The attention implementations that take a custom 4-D mask (boolean for sdpa, additive for eager).
MASKED_ATTENTION = ("sdpa", "eager")
PACKABLE_FAMILIES = ("mistral3",)  # compared with one full sequence per class in tests/test_evaluate.py


def attention_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)


def _root(model):
    """The transformers model under any peft wrapper: the same object before adapters are added and after."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def attention_path(model, family: Family) -> tuple:
    """What decides whether the attention honours packed_mask: the family, the attention implementation and the
    function it dispatches to, each attention module's class and forward, dtype and device. Training and folding
    change weights and linear layers, none of these."""
    implementation = attention_implementation(model)
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        dispatched = ALL_ATTENTION_FUNCTIONS.get(implementation)
    except Exception:  # noqa: BLE001 - an older or newer transformers: the modules' forwards still identify the path
        dispatched = None
    modules = {(f"{type(m).__module__}.{type(m).__qualname__}", id(type(m).forward), "forward" in vars(m))
               for m in model.modules() if type(m).__name__.endswith("Attention")}
    device, dtype = model_device_dtype(model)
    return (family.name, implementation, id(dispatched), tuple(sorted(modules)), str(dtype), str(device))


def passed_check(model, family: Family) -> dict | None:
    """The check that passed on an earlier pass over this model object (peft wrapper or not) along the same
    attention path (attention_path), in this process; None when there is none."""
    earlier = getattr(_root(model), "_unsloth_med_packed_check", None)
    if earlier is None or earlier[0] != attention_path(model, family):
        return None
    return earlier[1]


def remember_check(model, family: Family, check: dict) -> None:
    """Keep a check that passed on the model object itself (it lives and dies with the model); a failed one is
    not kept, so every pass on that path checks again."""
    if check.get("agreed"):
        _root(model)._unsloth_med_packed_check = (attention_path(model, family), dict(check))


def forget_check(model) -> None:
    """Drop the kept check, so that the next pass over this model checks again."""
    vars(_root(model)).pop("_unsloth_med_packed_check", None)


def can_pack(model, family: Family) -> bool:
    """Whether score_packed gives this model's label scores (see the module docstring for when it cannot)."""
    return family.name in PACKABLE_FAMILIES and attention_implementation(model) in MASKED_ATTENTION


def _continuations(ids: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Every class's answer tokens after the first, flattened: (input token, step after the prompt, class,
    the token it predicts)."""
    tokens, steps, owners, targets = [], [], [], []
    for c, answer in enumerate(ids):
        for j in range(len(answer) - 1):
            tokens.append(answer[j])
            steps.append(j)
            owners.append(c)
            targets.append(answer[j + 1])
    return tokens, steps, owners, targets


def packed_mask(prompt_mask: torch.Tensor, owners: torch.Tensor, dtype: torch.dtype, attention: str) -> torch.Tensor:
    """[B, 1, L, L] mask for left-padded prompts ([B, P], 1 = real token) followed by the packed continuations.

    Causal over the prompt's real tokens; a continuation token sees the whole prompt and the earlier tokens of its
    own class. A padding position sees itself only (a row that sees nothing would give NaN through softmax; its
    output is never read). Boolean (True = attend) for sdpa, additive (0 / dtype min) for eager."""
    rows, prompt_len = prompt_mask.shape
    total = prompt_len + len(owners)
    device = prompt_mask.device
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    causal[prompt_len:, prompt_len:] &= owners[:, None] == owners[None, :]
    real = torch.cat([prompt_mask.bool(), torch.ones(rows, len(owners), dtype=torch.bool, device=device)], dim=1)
    allowed = causal[None] & real[:, None, :]
    allowed |= torch.eye(total, dtype=torch.bool, device=device)[None]
    allowed = allowed[:, None]
    if attention == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.inference_mode()
def score_packed(model, processor: Any, family: Family, encoded: dict, ids: Sequence[Sequence[int]], *,
                 separate_classes: bool = True, wait: bool = True) -> torch.Tensor:
    """Summed log-likelihood (float64, [rows, classes]) of each class's answer tokens `ids` after each encoded
    (left-padded) prompt; equal to classify.score_encoded's, from one forward. `separate_classes=False` lets every
    class's tokens see the others' (wrong on purpose: check_packed's measure of what the mask changes).
    `wait=False` returns them on the model's device, without waiting for the GPU to compute them."""
    device, dtype = model_device_dtype(model)
    batch = to_model(encoded, device, dtype)
    prompt_ids, prompt_mask = batch.pop("input_ids"), batch.pop("attention_mask")
    rows = prompt_ids.shape[0]
    tokens, steps, owners, targets = (device_tensor(x, device, dtype=torch.long) for x in _continuations(ids))
    lengths = prompt_mask.long().sum(dim=1)
    positions = torch.cat([(prompt_mask.long().cumsum(-1) - 1).clamp(min=0), lengths[:, None] + steps[None, :]],
                          dim=1)
    logits = model(input_ids=torch.cat([prompt_ids, tokens.expand(rows, -1)], dim=1),
                   attention_mask=packed_mask(prompt_mask, owners if separate_classes else torch.zeros_like(owners),
                                              dtype, attention_implementation(model)),
                   position_ids=positions, use_cache=False, logits_to_keep=len(tokens) + 1, **batch).logits
    logp = logits.float().log_softmax(-1)  # [B, 1 + continuation tokens, V]: position 0 is the prompt's last
    first = device_tensor([a[0] for a in ids], logp.device)
    scores = logp[:, 0, first].double()
    if len(tokens):
        picked = logp[:, 1:].gather(-1, targets.to(logp.device)[None, :, None].expand(rows, -1, 1)).squeeze(-1)
        scores.index_add_(1, owners.to(scores.device), picked.double())
    return scores.cpu() if wait else scores


def first_rows(encoded: dict, n: int) -> dict:
    """The first `n` rows of an encoded batch; the whole batch when a tensor is not one entry per row (several
    images per row: pixel values cannot be cut by row without knowing which image is whose)."""
    rows = int(encoded["input_ids"].shape[0])
    tensors = [v for v in encoded.values() if isinstance(v, torch.Tensor) and v.dim()]
    if any(v.shape[0] != rows for v in tensors):
        return encoded
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in encoded.items()}


def check_packed(model, processor: Any, family: Family, encoded: dict, ids: Sequence[Sequence[int]],
                 cached: torch.Tensor, reference: torch.Tensor) -> dict:
    """Whether the packed strategy can be trusted on this model, on the first rows of a batch. `reference`: their
    scores from one full sequence per class (the definition), `cached`: by the cached strategy.

    In bf16 no two ways of computing the same scores agree exactly (kernels add in another order; seen on the
    14B shape: 0.24 nats on scores near 70), so the packed scores are held to the cached strategy's own distance
    from the reference: within twice that, plus 0.05 nats and 0.2% of the largest score, and the reference's best
    class on at least as many rows. And the mask must change what it should: an attention path that ignored the 4-D
    mask would give the same scores whether or not the classes are kept apart, however small that difference."""
    n = int(reference.shape[0])
    # first_rows gives the whole batch when its rows cannot be cut (several images per row); compare the first n.
    first = first_rows(encoded, n)
    packed = score_packed(model, processor, family, first, ids)[:n]
    unseparated = score_packed(model, processor, family, first, ids, separate_classes=False)[:n]
    cached = cached[:n]
    difference = float((packed - reference).abs().max())
    cached_difference = float((cached - reference).abs().max())
    mask_effect = float((packed - unseparated).abs().max())
    tolerance = 0.05 + 0.002 * float(reference.abs().max()) + 2 * cached_difference
    best = reference.argmax(-1)
    same_best = int((packed.argmax(-1) == best).sum()) >= int((cached.argmax(-1) == best).sum())
    return {"checked_rows": n, "reference": "one sequence per class",
            "max_difference_nats": round(difference, 6), "cached_difference_nats": round(cached_difference, 6),
            "tolerance_nats": round(tolerance, 4), "mask_effect_nats": round(mask_effect, 6),
            "agreed": same_best and difference <= tolerance and mask_effect > 0.0}
