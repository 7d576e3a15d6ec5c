"""The reload check of a merged export: a fixed batch of dataset rows, the tuned and the reloaded model's logits
and greedy answers compared within the saved dtype's tolerance, the verdict, and the processor check."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ExportError

log = logging.getLogger(__name__)


VERIFY_ROWS = 3  # rows in the fixed verification batch
LOGIT_POSITIONS = 64  # compare the logits of the last N tokens of each row (the instruction tail and the answer)
MAX_VERIFY_NEW_TOKENS = 24
# (atol, rtol) per saved dtype: tolerance = atol + rtol * max|reference logit|.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 2e-2), torch.float16: (2e-2, 5e-3)}


# ----------------------------------------------------------------------------- the model under test
def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _base_of(model):
    return model.get_base_model() if _is_peft(model) else model


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
    from ..data.images import load_image
    from ..models import prompting

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
