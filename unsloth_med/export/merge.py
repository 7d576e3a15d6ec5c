"""Merged 16-bit export: the merge (Unsloth's save_pretrained_merged, or the adapter on the 16-bit base and
peft's merge_and_unload on the CPU), written atomically and verified by reload (verify.py)."""
from __future__ import annotations

import gc
import logging
import re
import time
from pathlib import Path

import torch

from ..data.images import fit_record
from ..errors import ExportError
from . import verify
from .atomic import _AtomicDir, _check_no_secrets, _folder_listing, _recipe_info, _write_json
from .verify import (
    LOGIT_POSITIONS,
    TOLERANCES,
    VERIFY_ROWS,
    _base_of,
    _check_processor,
    _compare,
    _device,
    _disagreements,
    _encode_rows,
    _fixed_rows,
    _input_dtype,
    _is_peft,
    _outputs,
    _reload,
    tolerance_for,
    verdict,
    verification_summary,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- models
def _is_quantized(model) -> bool:
    base = _base_of(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base.config, "quantization_config", None))


def merge_dtype(model) -> torch.dtype:
    """The 16-bit (or fp32) dtype the merged weights are written in: the tuned model's compute dtype."""
    base = _base_of(model)
    if _is_quantized(model):
        qc = getattr(base.config, "quantization_config", None)
        compute = getattr(qc, "bnb_4bit_compute_dtype", None) if qc is not None and not isinstance(qc, dict) else \
            (qc or {}).get("bnb_4bit_compute_dtype")
        if isinstance(compute, str):
            compute = getattr(torch, compute.replace("torch.", ""), None)
        if compute in (torch.bfloat16, torch.float16):
            return compute
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    dtype = _input_dtype(model)
    return dtype if dtype in TOLERANCES else torch.bfloat16


def sixteen_bit_base(base_model: str, recipe=None) -> str:
    """The 16-bit checkpoint behind `base_model` (a pre-quantized bnb-4bit checkpoint maps to its original)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_model)
    except Exception as exc:  # noqa: BLE001 - any failure here means we cannot tell; let the real load report it
        log.warning("Could not read the config of %s (%s)", base_model, type(exc).__name__)
        return base_model
    if getattr(config, "quantization_config", None) is None:
        return base_model
    if recipe is not None and base_model == getattr(recipe, "default_model_4bit", None) and recipe.default_model:
        return recipe.default_model
    stripped = re.sub(r"(-unsloth)?-bnb-4bit$", "", base_model)
    if stripped != base_model:
        return stripped
    raise ExportError(
        f"The base model {base_model} is a pre-quantized checkpoint, and its 16-bit original is unknown. Merged "
        "16-bit weights need the original: export with the unsloth backend (on a GPU), or export the adapter "
        "(--format adapter) and merge it on the 16-bit original yourself."
    )


def _merge_on_16bit_base(model, base_model: str, dtype: torch.dtype, recipe):
    """A fresh 16-bit (or fp32) copy of the base on the CPU, the tuned model's adapter applied (not yet merged)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    name = sixteen_bit_base(base_model, recipe)
    log.info("Merging: loading base %s in %s on the CPU", name, str(dtype).replace("torch.", ""))
    base = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, device_map=None, low_cpu_mem_usage=True)
    base.eval()
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    config = model.peft_config[adapter]
    if str(getattr(config, "peft_type", "LORA")).split(".")[-1].upper() != "LORA":
        raise ExportError(f"Merged export supports LoRA adapters; this model has a {config.peft_type} adapter.")
    state = {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    merged = get_peft_model(base, config.__class__(**config.to_dict()), adapter_name=adapter)
    result = set_peft_model_state_dict(merged, state, adapter_name=adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ExportError(f"The adapter does not fit the 16-bit base {name}: unexpected {unexpected[:5]}, "
                          f"missing {missing[:5]}. Was the run trained on another base model?")
    merged.eval()
    return merged, name


# ----------------------------------------------------------------------------- merged export
def export_merged(backend, model, processor, recipe, dataset, out_dir, *, image_size, base_model,
                  verify_rows: int = VERIFY_ROWS, tolerance: float | None = None, run_dir=None,
                  model_name: str | None = None) -> dict:
    """Merged 16-bit weights + processor in out_dir, verified by reload; returns what export.json holds (+ path).

    `dataset`: rows {image, target, id} (a datasets.Dataset or a list); the first `verify_rows` form the
    verification batch (generated images when it is empty or None). `tolerance` overrides the dtype's.
    `run_dir`: the run folder whose metrics and config go into the model card (default: out_dir's parent).
    `model_name`: the model as the user named it (the card's wording; `base_model` is what was loaded).
    """
    from ..hub import model_card

    out_dir = Path(out_dir)
    started = time.time()
    backend_name = getattr(backend, "name", "hf")
    rows = _fixed_rows(recipe, dataset, verify_rows)
    max_new = max(1, min(int(getattr(recipe, "max_new_tokens", 16) or 16), verify.MAX_VERIFY_NEW_TOKENS))
    backend.for_inference(model)
    quantized = _is_quantized(model)
    dtype = merge_dtype(model)
    log.info("Export merged-16bit (%s backend, %s) to %s", backend_name, str(dtype).replace("torch.", ""), out_dir)

    encoded = _encode_rows(processor, recipe, rows, image_size)
    tuned = _outputs(model, processor, encoded, max_new)
    reference, reference_name, reference_device, strict = tuned, "the in-memory tuned model", _device(model), True
    unsloth_save = backend_name == "unsloth" and hasattr(model, "save_pretrained_merged")
    merged_from = base_model
    try:
        weights = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
        with _AtomicDir(out_dir, needed_bytes=weights) as tmp:
            peft_16 = None
            if _is_peft(model) and (quantized or not unsloth_save):
                try:
                    peft_16, merged_from = _merge_on_16bit_base(model, base_model, dtype, recipe)
                except ExportError:
                    if not unsloth_save:
                        raise
                    log.warning("No 16-bit original known for %s: the export cannot be verified (it is compared "
                                "with the 4-bit tuned model only, for information)", base_model)
                    strict = False
            if quantized and peft_16 is not None:
                # 4-bit rounding is not an export error: the strict reference is the same adapter on the
                # 16-bit base, before merging (both backends merge into the 16-bit original weights).
                reference = _outputs(peft_16, processor, encoded, max_new)
                reference_name, reference_device = "the adapter on the 16-bit base, before merging", torch.device("cpu")
            if unsloth_save:
                del peft_16
                gc.collect()
                method = "unsloth save_pretrained_merged(save_method='merged_16bit')"
                if hasattr(backend, "save_merged_16bit"):
                    backend.save_merged_16bit(model, processor, tmp)
                else:
                    model.save_pretrained_merged(str(tmp), processor, save_method="merged_16bit")
            elif peft_16 is not None:
                method = "16-bit base + adapter, peft merge_and_unload() on the CPU"
                merged = peft_16.merge_and_unload()
                del peft_16
                merged.save_pretrained(tmp, max_shard_size="5GB")
                del merged
                gc.collect()
            else:  # full fine-tune: the weights are the model itself
                if quantized:
                    raise ExportError("A full fine-tune of a quantized model cannot be exported as 16-bit weights.")
                method = "full fine-tune, saved as is"
                model.save_pretrained(tmp, max_shard_size="5GB")
            processor.save_pretrained(tmp)  # always the full processor, with the training chat template

            # Verification: plain transformers, from the folder as written.
            reloaded, reloaded_processor = _reload(tmp, reference_device)
            saved_dtype = _input_dtype(reloaded)
            info = {**_recipe_info(recipe, model_name), "base_model": merged_from, **fit_record(image_size),
                    "format": "merged-16bit", "dtype": str(saved_dtype).replace("torch.", ""), "trained_on": base_model}
            _write_json(tmp / "unsloth_med.json", info)
            processor_check = _check_processor(reloaded_processor, processor, recipe, rows, image_size)
            new = _outputs(reloaded, reloaded_processor, _encode_rows(reloaded_processor, recipe, rows, image_size),
                           max_new)
            del reloaded
            gc.collect()
            check = _compare(reference, new)
            # Unsloth merges the LoRA product in 16-bit even into a float32 checkpoint (seen on an H100: 0.009 on a
            # tiny fp32 model), so its exports are held to the bf16 tolerance whatever dtype they are saved in.
            tol_dtype = torch.bfloat16 if unsloth_save else saved_dtype
            dtype_tol = tolerance_for(tol_dtype, check["max_abs_logit"])
            tol = tolerance if tolerance is not None else dtype_tol
            disagreements = _disagreements(reference, new, dtype_tol)  # a near-tie is judged by the dtype's rounding
            verification = {
                "reference": reference_name, "rows": len(rows),
                "row_ids": [str(r.get("id", i)) for i, r in enumerate(rows)],
                "logit_positions_per_row": min(LOGIT_POSITIONS, *(e[0]["input_ids"].shape[1] for e in encoded)),
                **check, "tolerance": tol, "dtype": str(saved_dtype).replace("torch.", ""),
                "greedy_disagreements": disagreements,
                "answers_tuned": [r["text"] for r in reference], "answers_reloaded": [r["text"] for r in new],
                "processor": processor_check,
            }
            verification.update(verdict(check, tol, disagreements, strict=strict, base_model=base_model))
            if quantized and reference is not tuned:
                vs = _compare(tuned, new)
                verification["vs_quantized_tuned_model"] = {**vs, "note": "4-bit rounding of the trained model, "
                                                            "not an export error; informational"}
                if vs["greedy_agreement"] < 0.5:
                    log.warning("The merged 16-bit model answers differently from the 4-bit tuned model on %d of %d "
                                "verification images (4-bit rounding).",
                                round((1 - vs["greedy_agreement"]) * len(rows)), len(rows))
            log.info("Export check: max abs logit diff %.3g (tolerance %.3g), greedy agreement %.2f",
                     check["max_abs_logit_diff"], tol, check["greedy_agreement"])
            if verification["status"] == "failed":
                raise ExportError(
                    f"The exported model disagrees with {reference_name}: max abs logit difference "
                    f"{check['max_abs_logit_diff']:.3g} (tolerance {tol:.3g}, {verification['dtype']}), greedy answers "
                    f"agree on {check['greedy_agreement']:.0%} of {len(rows)} images"
                    f"{' (not on a near-tie)' if check['greedy_agreement'] < 1 else ''}. The folder was not kept. This "
                    "usually means the adapter was not merged (or merged twice), or weights were lost on save."
                )
            weights = describe_weights(method, verification["dtype"])
            (tmp / "README.md").write_text(model_card(recipe, base_model=merged_from, export_format="merged-16bit",
                                                      run_dir=run_dir or out_dir.parent,
                                                      image_size=fit_record(image_size)["image_size"],
                                                      verification=verification, weights=weights,
                                                      model_name=model_name))
            files, size = _folder_listing(tmp)
            _check_no_secrets(tmp)
            result = {"format": "merged-16bit", "weights": weights, "backend": backend_name, "method": method,
                      "base_model": merged_from,
                      "recipe": info["recipe"], **fit_record(image_size), "dtype": info["dtype"],
                      "quantized_training": quantized, "files": files + ["export.json"], "size_bytes": size,
                      "verification": verification, "seconds": round(time.time() - started, 1)}
            _write_json(tmp / "export.json", result)  # written last: marks the folder complete
    except torch.OutOfMemoryError as exc:
        raise ExportError(f"Out of memory while exporting ({exc}). The hf backend merges on the CPU: free RAM or "
                          "export later with `unsloth-med export RUN_DIR --format merged-16bit`.") from exc
    print(f"Exported {weights}: {out_dir} ({verification_summary(verification)})")
    return {**result, "path": str(out_dir)}


def describe_weights(method: str, dtype: str) -> str:
    """What a merged-format export holds, in the words the CLI, export.json and the model card all use."""
    if method.startswith("full fine-tune"):
        return f"full fine-tuned weights in {dtype} (no adapter to merge)"
    return f"LoRA adapter merged into the base weights, in {dtype}"
