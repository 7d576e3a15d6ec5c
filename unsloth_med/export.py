"""Export a tuned model: merged 16-bit weights (verified by reload) or the LoRA adapter.

    unsloth-med export RUN_DIR --format adapter|merged-16bit [--out DIR] [--push-to-hub OWNER/NAME] [--public]

Merged export:
- unsloth backend: `model.save_pretrained_merged(dir, processor, save_method="merged_16bit")`.
- hf backend: the base checkpoint is loaded again in 16-bit (or fp32, when the tuned model is fp32) on
  the CPU, the tuned model's LoRA weights are applied to it and `merge_and_unload()` folds them in. This
  also holds when training used a 4-bit base: the merge goes into the original 16-bit weights, never
  into dequantized 4-bit ones, and never needs GPU memory for a second copy of the model.
- Always saved beside the weights: the full processor (tokenizer, image processor, the chat template
  the model was trained with), `unsloth_med.json` (recipe, base_model, image_size), a model card.

Verification after every merged export: the folder is reloaded with plain `AutoModelForImageTextToText`
/ `AutoProcessor` and compared with the in-memory tuned model on a fixed batch of a few dataset rows
(the first rows: images from the dataset, the recipe's prompt and answer): max abs logit difference
and greedy-answer agreement, written to `export.json`. A difference beyond the tolerance of the saved
dtype raises ExportError. When the tuned model is 4-bit, the strict reference is the same adapter on
the 16-bit base before merging (4-bit rounding is not an export error); the difference to the 4-bit
model is reported beside it.

Atomic: everything is written into a hidden temporary sibling folder (`.NAME.partial-*`), and
`export.json`, written last, marks it complete; only then is it renamed to NAME with `os.replace`.
An export that fails or is interrupted leaves no NAME folder (and an older export there untouched).
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch

from .data.images import fit_record, recorded_buckets
from .disk import disk_full_message, folder_bytes, is_disk_full, mib
from .errors import ExportError, UnslothMedError
from .models.families import image_fit
from .secrets import redact

log = logging.getLogger(__name__)

FORMATS = ("merged-16bit", "adapter", "gguf")
VERIFY_ROWS = 3  # rows in the fixed verification batch
LOGIT_POSITIONS = 64  # compare the logits of the last N tokens of each row (the instruction tail and the answer)
MAX_VERIFY_NEW_TOKENS = 24
# (atol, rtol) per saved dtype: tolerance = atol + rtol * max|reference logit|.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 2e-2), torch.float16: (2e-2, 5e-3)}


# ----------------------------------------------------------------------------- atomic folders
def _partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out_dir: Path) -> None:
    """Partial folders left by an export that was killed (its process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(partial|old)-(\d+)-[0-9a-f]+$")
    if not out_dir.parent.is_dir():
        return
    for path in out_dir.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(2))):
            log.info("Removing %s, left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished tmp folder to out_dir, replacing an older export there."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _AtomicDir:
    """`with _AtomicDir(out) as tmp:` write into tmp; published as `out` only if the block completes."""

    def __init__(self, out_dir: Path, needed_bytes: int | None = None):
        self.out_dir, self.needed_bytes = out_dir, needed_bytes

    def __enter__(self) -> Path:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.out_dir)
        self.tmp = _partial_dir(self.out_dir)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                _publish(self.tmp, self.out_dir)
                return False
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        written = folder_bytes(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if exc is not None and is_disk_full(exc, self.out_dir.parent):
            what = f"the export {self.out_dir.name}"
            raise ExportError(disk_full_message(self.out_dir.parent, what, self.needed_bytes)
                              + f" ({mib(written)} were written before it filled; that partial folder was removed, so "
                              f"nothing new at {self.out_dir} looks complete). Then export again.") from exc
        return False


def _write_json(path: Path, data: dict) -> None:
    path.write_text(redact(json.dumps(data, indent=1, default=str)))


def _folder_listing(folder: Path) -> tuple[list[str], int]:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return files, sum((folder / f).stat().st_size for f in files)


def _check_no_secrets(folder: Path) -> None:
    from .hub import files_with_secrets

    leaked = files_with_secrets(folder)
    if leaked:
        raise ExportError("The export would contain the value of a secret environment variable in: "
                          f"{', '.join(leaked)}. Nothing was written. "
                          "Remove the secret from the config or model files and export again.")


# ----------------------------------------------------------------------------- models
def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _base_of(model):
    return model.get_base_model() if _is_peft(model) else model


def _is_quantized(model) -> bool:
    base = _base_of(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base.config, "quantization_config", None))


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _input_dtype(model) -> torch.dtype:
    """The dtype floating inputs (pixel values) should have for this model."""
    try:
        dtype = _base_of(model).get_input_embeddings().weight.dtype
        if dtype.is_floating_point:
            return dtype
    except AttributeError:
        pass
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


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


def _recipe_info(recipe, model_name: str | None = None) -> dict:
    """What unsloth_med.json records of the recipe (its resolved instruction, labels and data source: enough to
    describe and rebuild it) and the model as the user named it (e.g. tiny:mistral3, not a cache path)."""
    from .recipes import recipe_record

    return {**recipe_record(recipe), **({"model": model_name} if model_name else {})}


# ----------------------------------------------------------------------------- the verification batch
def _fixed_rows(recipe, dataset, n: int) -> list[dict]:
    if dataset is None or len(dataset) == 0:
        return synthetic_rows(recipe, n)
    return [dict(dataset[i]) for i in range(min(n, len(dataset)))]


def synthetic_rows(recipe, n: int = VERIFY_ROWS) -> list[dict]:
    """Fixed generated images (for exports without the dataset at hand): the weights are what is compared."""
    import numpy as np
    from PIL import Image

    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:256, 0:256]
        img = (x * (i + 1) + y * 2) % 256 * 0.6 + rng.integers(0, 100, (256, 256))
        target = recipe.labels[i % len(recipe.labels)] if getattr(recipe, "labels", ()) else "A radiograph."
        rows.append({"image": Image.fromarray(img.clip(0, 255).astype("uint8"), "L").convert("RGB"),
                     "target": target, "id": f"synthetic-{i}"})
    return rows


def _encode_rows(processor, recipe, rows: list[dict], image_size):
    from .data.images import load_image
    from .models import prompting

    out = []
    for row in rows:
        image = load_image(row["image"], image_size)
        full = prompting.render(processor, recipe.to_conversation(row))
        prompt = prompting.render(processor, recipe.prompt(), add_generation_prompt=True)
        out.append((prompting.encode(processor, [full], [image]), prompting.encode(processor, [prompt], [image])))
    return out


def _to(batch, device, dtype) -> dict:
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def _outputs(model, processor, encoded, max_new_tokens: int) -> list[dict]:
    """Per row: the logits of its last tokens (CPU fp32) and the greedy answer token ids."""
    device, dtype = _device(model), _input_dtype(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    results = []
    for full, prompt in encoded:
        batch = _to(full, device, dtype)
        keep = min(LOGIT_POSITIONS, batch["input_ids"].shape[1])
        try:
            logits = model(**batch, logits_to_keep=keep).logits
        except TypeError:
            logits = model(**batch).logits
        logits = logits[0, -keep:].float().cpu()
        batch = _to(prompt, device, dtype)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=tokenizer.pad_token_id, output_logits=True,
                                   return_dict_in_generate=True)
        answer = generated.sequences[0, batch["input_ids"].shape[1]:].tolist()
        step_logits = [step[0].float().cpu() for step in (getattr(generated, "logits", None) or ())]
        results.append({"logits": logits, "answer": answer, "step_logits": step_logits,
                         "text": tokenizer.decode(answer, skip_special_tokens=True)})
    return results


def _compare(ref: list[dict], new: list[dict]) -> dict:
    diff = max(float((a["logits"] - b["logits"]).abs().max()) for a, b in zip(ref, new))
    scale = max(float(a["logits"].abs().max()) for a in ref)
    agree = sum(a["answer"] == b["answer"] for a, b in zip(ref, new)) / len(ref)
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "greedy_agreement": agree}


def _disagreements(ref: list[dict], new: list[dict], tolerance: float) -> list[dict]:
    """Where the greedy answers differ: the first differing token and whether it is a near-tie.

    Up to that token both models saw the same text, so the reference's logits there are comparable: when
    the reference scores the reloaded model's token within `tolerance` of its own, the answers split on a
    tie that the export's rounding may flip (not an export error); any larger margin is a real difference.
    """
    found = []
    for row, (a, b) in enumerate(zip(ref, new)):
        if a["answer"] == b["answer"]:
            continue
        position = next((i for i, (x, y) in enumerate(zip(a["answer"], b["answer"])) if x != y),
                        min(len(a["answer"]), len(b["answer"])))
        margin = None
        steps = a.get("step_logits") or []
        if position < len(steps) and position < len(a["answer"]) and position < len(b["answer"]):
            scores = steps[position]
            margin = float(scores[a["answer"][position]] - scores[b["answer"][position]])
        found.append({"row": row, "first_differing_token": position, "reference_margin": margin,
                      "near_tie": margin is not None and margin <= tolerance})
    return found


def verdict(check: dict, tolerance: float, disagreements: list[dict], *, strict: bool, base_model: str) -> dict:
    """status passed / failed / not verified, and `passed` (True, False, or None when nothing was compared).

    Passed: the logits agree within the tolerance and every greedy answer agrees (or splits only on a
    near-tie). Not strict: the only model at hand was the 4-bit one, whose rounding differs from a 16-bit
    merge by more than an export error would, so the export was compared with nothing it should equal.
    """
    if not strict:
        return {"status": "not verified", "passed": None, "reference": None,
                "reason": f"the 16-bit original of {base_model} is unknown, so there was no 16-bit reference to "
                          "compare the merged weights with (the numbers recorded compare them with the 4-bit tuned "
                          "model, for information only)"}
    passed = check["max_abs_logit_diff"] <= tolerance and all(d["near_tie"] for d in disagreements)
    return {"status": "passed" if passed else "failed", "passed": passed}


def tolerance_for(dtype: torch.dtype, scale: float) -> float:
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    return atol + rtol * scale


def _reload(folder: Path, device: torch.device):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
    model.eval()
    if device.type != "cpu":
        try:
            model = model.to(device)
        except torch.OutOfMemoryError:
            log.warning("Not enough GPU memory to check the merged model there: checking it on the CPU")
            torch.cuda.empty_cache()
            model = model.to("cpu")
    return model, processor


def _check_processor(reloaded, processor, recipe, rows, image_size) -> dict:
    """The reloaded processor renders the same chat template and encodes the same tensors."""
    template_ok = bool(getattr(reloaded, "chat_template", None)) and reloaded.chat_template == processor.chat_template
    if not template_ok:
        raise ExportError("The exported processor lost the chat template the model was trained with "
                          "(chat_template.jinja missing or different).")
    mine, theirs = (_encode_rows(processor, recipe, rows[:1], image_size)[0],
                    _encode_rows(reloaded, recipe, rows[:1], image_size)[0])
    for a, b in zip(mine, theirs):
        for key in a:
            if (key not in b or not torch.is_tensor(a[key]) or a[key].shape != b[key].shape
                    or not torch.equal(a[key], b[key])):
                raise ExportError(f"The exported processor encodes the verification image differently ('{key}'): "
                                  "processor files are missing or incomplete in the export.")
    return {"chat_template": True, "inputs_identical": True, "class": type(reloaded).__name__}


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
    from .hub import model_card

    out_dir = Path(out_dir)
    started = time.time()
    backend_name = getattr(backend, "name", "hf")
    rows = _fixed_rows(recipe, dataset, verify_rows)
    max_new = max(1, min(int(getattr(recipe, "max_new_tokens", 16) or 16), MAX_VERIFY_NEW_TOKENS))
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


def verification_summary(verification: dict) -> str:
    """One line: what the reload check compared and found, or why it could not compare."""
    status = verification.get("status")
    if status == "not verified":
        return f"NOT VERIFIED: {verification.get('reason', 'no reference to compare with')}"
    rows = verification.get("rows", 0)
    agreeing = round(verification.get("greedy_agreement", 0) * rows)
    ties = sum(bool(d.get("near_tie")) for d in verification.get("greedy_disagreements", ()))
    return (f"verification {status}: reloaded and compared with {verification.get('reference')}, max abs logit "
            f"difference {verification.get('max_abs_logit_diff', float('nan')):.2e} (tolerance "
            f"{verification.get('tolerance', float('nan')):.2e}), greedy answers agree on {agreeing} of {rows}"
            + (f", {ties} split on a near-tie" if ties else ""))


# ----------------------------------------------------------------------------- adapter export
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_adapter(adapter_dir, out_dir, *, recipe, base_model: str, image_size, run_dir=None,
                   model_name: str | None = None) -> dict:
    """Copy a run's adapter (+ processor) into out_dir with a model card; check it reloads. Atomic."""
    from peft import PeftConfig
    from transformers import AutoProcessor

    from .hub import model_card

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    started = time.time()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json missing). A full fine-tune has "
                          "no adapter: export it with --format merged-16bit.")
    with _AtomicDir(out_dir, needed_bytes=folder_bytes(adapter_dir)) as tmp:
        for path in sorted(adapter_dir.iterdir()):
            if path.is_file() and path.name not in ("README.md", "export.json"):
                shutil.copy2(path, tmp / path.name)
        sources = {p.name: _sha256(p) for p in adapter_dir.iterdir()
                   if p.is_file() and p.name not in ("README.md", "export.json")}
        copied = {name: _sha256(tmp / name) for name in sources}
        if copied != sources:
            raise ExportError(f"Copying {adapter_dir} to {out_dir} changed files: "
                              f"{sorted(n for n in sources if copied[n] != sources[n])}")
        PeftConfig.from_pretrained(str(tmp))
        from safetensors import safe_open

        weights = tmp / "adapter_model.safetensors"
        with safe_open(str(weights), "pt") as fh:
            keys = list(fh.keys())
        if not any("lora_" in k for k in keys):
            raise ExportError(f"{weights} holds no LoRA weights.")
        processor = AutoProcessor.from_pretrained(tmp)
        if not getattr(processor, "chat_template", None):
            raise ExportError(f"The processor in {adapter_dir} has no chat template: "
                              "the run saved an incomplete processor.")
        text = processor.apply_chat_template(recipe.prompt(), tokenize=False, add_generation_prompt=True)
        info = {**_recipe_info(recipe, model_name), "base_model": base_model, "image_size": image_size,
                "format": "adapter"}
        _write_json(tmp / "unsloth_med.json", info)
        verification = {"files_identical_to_run": True, "lora_tensors": sum("lora_" in k for k in keys),
                        "peft_config": True,
                        "processor": {"class": type(processor).__name__, "chat_template": bool(text)}}
        (tmp / "README.md").write_text(model_card(recipe, base_model=base_model, export_format="adapter",
                                                  run_dir=run_dir, image_size=image_size, model_name=model_name))
        files, size = _folder_listing(tmp)
        _check_no_secrets(tmp)
        result = {"format": "adapter", "base_model": base_model, "recipe": recipe.name, "image_size": image_size,
                  "files": files + ["export.json"], "size_bytes": size, "verification": verification,
                  "seconds": round(time.time() - started, 1)}
        _write_json(tmp / "export.json", result)
    print(f"Adapter export: {out_dir}")
    return {**result, "path": str(out_dir)}


# ----------------------------------------------------------------------------- from a run folder
def _run_info(run_dir: Path) -> tuple[dict, dict]:
    adapter_dir = run_dir / "adapter"
    meta_path = adapter_dir / "unsloth_med.json"
    if not meta_path.is_file():
        raise ExportError(f"{run_dir} is not a finished run folder: {meta_path} is missing (training did not "
                          "complete, or this is not a run folder). Point at a folder written by `unsloth-med train`.")
    meta = json.loads(meta_path.read_text())
    config = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return meta, config


def _run_recipe(meta: dict, config: dict):
    """The run's recipe as it was trained: built-in by name; generic ones (classify/caption) rebuilt from the
    labels and instruction recorded in config.yaml (or adapter/unsloth_med.json)."""
    from .recipes import get_recipe, recorded_recipe

    try:
        recipe = get_recipe(meta["recipe"])
    except UnslothMedError as exc:  # e.g. a recipe module that is not importable here
        if "data_source" not in meta:
            raise
        log.warning("Using the recipe as the run recorded it: %s", exc)
        return recorded_recipe(meta)
    values = dict(config.get("data") or {})
    for key in ("labels", "instruction"):
        if meta.get(key) and not values.get(key):
            values[key] = meta[key]
    try:
        from .recipes.generic import resolve_recipe
    except ImportError:
        return recipe
    try:
        recipe = resolve_recipe(recipe, values)
    except UnslothMedError as exc:
        raise ExportError(f"Could not rebuild the run's recipe '{meta['recipe']}' from its config.yaml: {exc}") from exc
    recorded = meta.get("data_source")
    if recorded:  # the data the run actually used (e.g. the demo's generated images, not the recipe's download)
        recipe = dataclasses.replace(recipe, source=dataclasses.replace(
            recipe.source, id=recorded.get("id", ""), attribution=recorded.get("attribution", "")))
    return recipe


def _model_args(config: dict):
    from .config import ModelArgs

    section = config.get("model") or {}
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in section.items() if k in names})


def _verification_dataset(recipe, config: dict):
    """The run's test rows when its data is on disk here; otherwise generated images."""
    data_dir = (config.get("data") or {}).get("data_dir")
    if data_dir and Path(data_dir).exists():
        try:
            from .data.sources import load_recipe_data

            return load_recipe_data(recipe, data_dir, seed=(config.get("training") or {}).get("seed", 3407))["test"]
        except UnslothMedError as exc:
            log.warning("Could not load the run's test data for the export check (%s): using generated images", exc)
    return None


def export_run(run_dir, *, format: str = "merged-16bit", out: str | None = None, backend: str | None = None,
               quant: str = "f16") -> dict:
    """Export a finished run folder: `adapter` (copy + card) or `merged-16bit` (base + adapter, merged, verified).

    Default destinations: RUN_DIR/merged and RUN_DIR/adapter-export.
    """
    from .backends import pick_backend

    if format not in FORMATS:
        raise ExportError(f"Unknown export format '{format}'. Choose {' or '.join(FORMATS)}.")
    if format == "gguf":  # llama.cpp text + mmproj GGUF from the merged weights: unsloth_med/gguf/
        from .gguf import export_gguf

        return export_gguf(run_dir, out=out, quant=quant)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"Run folder {run_dir} does not exist.")
    meta, config = _run_info(run_dir)
    recipe = _run_recipe(meta, config)
    base_model, image_size = meta["base_model"], meta.get("image_size") or recipe.image_size
    adapter_dir = run_dir / "adapter"
    if format == "adapter":
        return export_adapter(adapter_dir, Path(out) if out else run_dir / "adapter-export", recipe=recipe,
                              base_model=base_model, image_size=image_size, run_dir=run_dir,
                              model_name=meta.get("model"))

    model_args = _model_args(config)
    chosen = pick_backend(backend or model_args.backend or "auto")
    if (adapter_dir / "adapter_config.json").is_file():
        model, processor = chosen.load_adapter(base_model, adapter_dir, model_args)
    elif (adapter_dir / "config.json").is_file():  # full fine-tune: the folder holds the whole model
        model, processor = chosen.load(str(adapter_dir), model_args)
    else:
        raise ExportError(f"{adapter_dir} holds neither an adapter nor a model. Train the run to the end first.")
    dataset = _verification_dataset(recipe, config)
    fit = image_fit(model.config, image_size, buckets=recorded_buckets(meta, config))
    return export_merged(chosen, model, processor, recipe, dataset, Path(out) if out else run_dir / "merged",
                         image_size=fit, base_model=base_model, run_dir=run_dir, model_name=meta.get("model"))
