"""GGUF export for llama.cpp and Ollama: text GGUF + mmproj GGUF from a run's merged weights, verified in llama.cpp.

    unsloth-med export RUN_DIR --format gguf [--quant f16|q8_0|q4_k_m] [--out DIR]

1. The run's merged 16-bit export (RUN_DIR/merged, made and verified by `export.py` when missing) is the source.
2. The pinned llama.cpp converter (`convert.py`, with our fixes) writes an f16 text GGUF and an f16 mmproj GGUF;
   `llama-quantize` makes q8_0 / q4_k_m text weights (the mmproj stays f16, as llama.cpp recommends).
3. Verification: the GGUF + mmproj run in llama.cpp (`run_llama.py`, its C API through ctypes) on the export's
   verification images; against the merged model in transformers (fp32 on the CPU) we compare the prompt's
   last-position logits (max abs difference within the type's tolerance, same argmax, same top-5), the prompt's
   token count (image + text), and for classification recipes the per-label log-probabilities (same predicted
   label). Written to export.json; a disagreement raises ExportError and keeps nothing.
4. A model card (hub.model_card: the run's metrics, data attribution and the medical disclaimer, with the exact
   `llama-mtmd-cli`, `llama-server` and Ollama lines), unsloth_med.json (the recipe as the run recorded it, so
   `export --push-to-hub` and `unsloth-med push` can rebuild the card) and an Ollama Modelfile.

Llama 3.2 Vision (mllama) is refused: llama.cpp has no converter for its cross-attention layout.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ExportError
from . import llamacpp

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_k_m")
QUANTIZE_TYPE = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
# Logit tolerance = atol + rtol * max|reference logit|, per text-weight type. f16 rounding of the weights keeps
# logits within ~1e-3; q8_0 and q4_k_m change them by design, so only agreement (argmax, labels) is strict there.
TOLERANCES = {"f16": (1e-3, 1e-3), "q8_0": (5e-2, 2e-2), "q4_k_m": (0.5, 0.1)}
# Qwen2-VL in llama.cpp uses a fixed RMS-norm epsilon, not the file's (the feasibility probe): on the tiny test
# model (text rms_norm_eps 1e-5) logits then differ by 1.07e-2 at f16, with identical argmax, top-5 and labels.
# Real checkpoints use the epsilon llama.cpp fixes. Argmax, prompt tokens and labels stay strict.
QWEN_F16_ATOL = 2e-2
TOP_K = 5
MEDIA_MARKER = "<__media__>"  # mtmd_default_marker(): where llama.cpp puts the image in a prompt
# What the family's chat template renders for one image; llama.cpp's mtmd writes those tokens itself.
IMAGE_PLACEHOLDERS = {"mistral3": "[IMG]", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
REFUSED = {
    "mllama": "Llama 3.2 Vision (mllama) cannot be exported to GGUF: llama.cpp has no converter or runtime for its "
              "cross-attention image layers. Export merged 16-bit weights (--format merged-16bit) and serve them "
              "with transformers or vLLM, or fine-tune a Mistral 3 or Qwen2.5-VL model for llama.cpp.",
    "gemma3": "GGUF export of gemma3 runs is not verified by unsloth-med yet. Export merged 16-bit weights "
              "(--format merged-16bit) and convert them with llama.cpp's convert_hf_to_gguf.py yourself.",
}


# ----------------------------------------------------------------------------- checks and file names
def check_family(family_name: str) -> None:
    """Refuse families llama.cpp (or this export) cannot handle, before any work is done."""
    if family_name in IMAGE_PLACEHOLDERS:
        return
    raise ExportError(REFUSED.get(family_name, f"GGUF export does not support model family '{family_name}'. "
                                               f"Supported: {', '.join(IMAGE_PLACEHOLDERS)}."))


def _run_family(run_dir: Path, base_model: str) -> str:
    """The run's model family, from its merged config when there is one, else from the base model's config."""
    from transformers import AutoConfig

    from ..models import resolve_model_name

    source = run_dir / "merged" if (run_dir / "merged" / "config.json").is_file() else None
    if source is None:
        source = run_dir / "adapter" if (run_dir / "adapter" / "config.json").is_file() else \
            resolve_model_name(base_model, None, "hf")
    try:
        return AutoConfig.from_pretrained(str(source)).model_type
    except Exception as exc:  # noqa: BLE001 - any failure: name the model and stop
        raise ExportError(f"Could not read the model config of {source} to check GGUF support: {exc}") from exc


def _family_name(model_type: str) -> str:
    from ..errors import UnsupportedModelError
    from ..models.families import family_for_model_type

    try:
        return family_for_model_type(model_type).name
    except UnsupportedModelError:
        return model_type


def file_names(name: str, quant: str) -> tuple[str, str]:
    return f"{name}-{quant.upper()}.gguf", f"mmproj-{name}-F16.gguf"


# ----------------------------------------------------------------------------- conversion
def _run(command: list[str], what: str, env: dict | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-2000:]
        raise ExportError(f"{what} failed (exit {done.returncode}): `{' '.join(map(str, command))}`\n{tail}")
    return done.stdout + done.stderr


def _python_env() -> dict:
    """The subprocesses import this package (unsloth_med.gguf.*) from where this process found it."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def convert(merged_dir: Path, text_out: Path, mmproj_out: Path, quant: str) -> dict:
    """Text + mmproj GGUF from an HF folder; quantized text weights via llama-quantize. Returns timings."""
    started = time.time()
    source = llamacpp.ensure_sources()
    f16_text = text_out if quant == "f16" else text_out.with_name(text_out.stem + ".f16-tmp.gguf")
    _run([sys.executable, "-m", "unsloth_med.gguf.convert", "--llama-cpp", str(source), "--model", str(merged_dir),
          "--text", str(f16_text), "--mmproj", str(mmproj_out), "--outtype", "f16"],
         "Converting to GGUF (llama.cpp convert_hf_to_gguf.py)", env=_python_env())
    timings = {"convert_s": round(time.time() - started, 1)}
    if quant != "f16":
        started = time.time()
        quantize = llamacpp.ensure_built(("llama-quantize",)) / "llama-quantize"
        _run([str(quantize), str(f16_text), str(text_out), QUANTIZE_TYPE[quant]], f"llama-quantize to {quant}")
        f16_text.unlink()
        timings["quantize_s"] = round(time.time() - started, 1)
    return timings


# ----------------------------------------------------------------------------- verification
def _prompt_for_llama(processor, recipe, family_name: str) -> str:
    from ..models import prompting

    text = prompting.render(processor, recipe.prompt(), add_generation_prompt=True)
    placeholder = IMAGE_PLACEHOLDERS[family_name]
    if text.count(placeholder) != 1:
        raise ExportError(f"The chat template renders {text.count(placeholder)} image placeholders "
                          f"'{placeholder}' for one image; GGUF verification needs exactly one.")
    return text.replace(placeholder, MEDIA_MARKER)


def _hf_reference(model, processor, recipe, images, family) -> dict:
    """The merged model in transformers: last-position logits of the prompt, its length, label log-probs."""
    import torch

    from ..evaluate.classify import label_token_ids, score_rows
    from ..models import prompting

    prompt = prompting.render(processor, recipe.prompt(), add_generation_prompt=True)
    last, lengths = [], []
    with torch.inference_mode():
        for image in images:
            batch = prompting.encode(processor, [prompt], [image])
            last.append(model(**batch, logits_to_keep=1).logits[0, -1].float().numpy())
            lengths.append(int(batch["input_ids"].shape[1]))
    result = {"last_logits": last, "prompt_tokens": lengths}
    if recipe.is_classification and recipe.labels:
        rows = [{"image": im} for im in images]
        result["label_logprobs"] = score_rows(model, processor, recipe, rows, list(recipe.labels), strategy="full",
                                              family=family).numpy()
        result["answers"] = label_token_ids(processor, family, list(recipe.labels))
    return result


def _image_token_bounds(model, processor, images, family_name: str) -> dict:
    """Qwen: llama.cpp's default minimum image tokens (8) can exceed what HF uses for small images; pass HF's."""
    if family_name != "qwen2_5_vl":
        return {}
    counts = []
    for image in images:
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        counts.append(int(grid.prod()) // (processor.image_processor.merge_size ** 2))
    return {"image_min_tokens": min(counts), "image_max_tokens": max(counts)}


def run_in_llama_cpp(text_gguf: Path, mmproj_gguf: Path, images, prompt: str, answers, bounds: dict,
                     threads: int = 2) -> dict:
    """Last-position logits, label log-probs and prompt token counts from llama.cpp (a subprocess)."""
    import numpy as np

    bin_dir = llamacpp.ensure_built()
    with tempfile.TemporaryDirectory(prefix="unsloth-med-gguf-check-") as tmp:
        rows = []
        for i, image in enumerate(images):
            path = Path(tmp) / f"image-{i}.png"
            image.save(path)
            rows.append({"image": str(path), "prompt": prompt, "answers": answers})
        job = {"model": str(text_gguf), "mmproj": str(mmproj_gguf), "lib_dir": str(bin_dir),
               "bindings": str(llamacpp.bindings_dir()), "threads": threads, "rows": rows, **bounds}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        out = Path(tmp) / "out.npz"
        _run([sys.executable, "-m", "unsloth_med.gguf.run_llama", str(Path(tmp) / "job.json"), str(out)],
             "Running the GGUF in llama.cpp", env=_python_env())
        with np.load(out) as data:
            return {k: data[k] for k in data.files}


def compare(reference: dict, llama: dict, quant: str, family_name: str, labels=()) -> dict:
    """What export.json records; `passed` is False when llama.cpp and transformers disagree."""
    import numpy as np

    ref = np.stack(reference["last_logits"]).astype(np.float64)
    got = llama["last_logits"].astype(np.float64)
    atol, rtol = TOLERANCES[quant]
    if quant == "f16" and family_name == "qwen2_5_vl":
        atol = max(atol, QWEN_F16_ATOL)
    scale = float(np.abs(ref).max())
    tolerance = atol + rtol * scale
    diff = float(np.abs(ref - got).max())
    top_ref = np.argsort(-ref, axis=1)[:, :TOP_K]
    top_got = np.argsort(-got, axis=1)[:, :TOP_K]
    argmax_same = [bool(a[0] == b[0]) for a, b in zip(top_ref, top_got)]
    # A near-tie at the top (margin within the tolerance) may flip without any export error.
    sorted_ref = np.sort(ref, axis=1)
    decisive = [bool(m > 2 * tolerance) for m in sorted_ref[:, -1] - sorted_ref[:, -2]]
    tokens_same = [int(a) == int(b) for a, b in zip(reference["prompt_tokens"], llama["prompt_tokens"])]
    result = {
        "text_type": quant, "mmproj_type": "f16", "rows": len(ref),
        "max_abs_logit_diff": diff, "max_abs_logit": scale, "tolerance": tolerance,
        "tolerance_rule": f"{atol:g} + {rtol:g} * max|logit|",
        "argmax_agreement": float(np.mean(argmax_same)), f"top{TOP_K}_identical": float(np.mean(
            [set(a) == set(b) for a, b in zip(top_ref, top_got)])),
        "prompt_tokens_hf": [int(x) for x in reference["prompt_tokens"]],
        "prompt_tokens_llama_cpp": [int(x) for x in llama["prompt_tokens"]],
    }
    problems = []
    if not all(tokens_same):
        problems.append(f"prompt token counts differ (transformers {result['prompt_tokens_hf']}, llama.cpp "
                        f"{result['prompt_tokens_llama_cpp']}): the image or the text is tokenized differently")
    if diff > tolerance and quant == "f16":
        problems.append(f"max abs logit difference {diff:.3g} > tolerance {tolerance:.3g}")
    if not all(same or not sure for same, sure in zip(argmax_same, decisive)):
        problems.append(f"the most likely next token differs on {argmax_same.count(False)} of {len(ref)} images")
    if "label_logprobs" in reference:
        ref_scores, got_scores = np.asarray(reference["label_logprobs"]), llama["label_logprobs"]
        ref_pred, got_pred = ref_scores.argmax(1), got_scores.argmax(1)
        ordered = np.sort(ref_scores, axis=1)
        margin_ok = (ordered[:, -1] - ordered[:, -2]) > 2 * tolerance if ref_scores.shape[1] > 1 else \
            np.ones(len(ref_pred), bool)
        result["labels"] = {
            "labels": list(labels), "max_abs_logprob_diff": float(np.abs(ref_scores - got_scores).max()),
            "prediction_agreement": float(np.mean(ref_pred == got_pred)),
            "predicted_hf": [labels[i] for i in ref_pred], "predicted_llama_cpp": [labels[i] for i in got_pred],
        }
        if not all((a == b) or not sure for a, b, sure in zip(ref_pred, got_pred, margin_ok)):
            problems.append(f"label scoring picks a different class on {int((ref_pred != got_pred).sum())} images")
    result["problems"] = problems
    result["passed"] = not problems
    return result


# ----------------------------------------------------------------------------- model card
def usage_lines(text_name: str, mmproj_name: str, instruction: str, bounds: dict, name: str) -> dict:
    extra = f" --image-min-tokens {bounds['image_min_tokens']}" if bounds.get("image_min_tokens") else ""
    quoted = instruction.replace('"', '\\"')
    return {
        "llama-mtmd-cli": f'llama-mtmd-cli -m {text_name} --mmproj {mmproj_name} --jinja --temp 0{extra} '
                          f'--image xray.png -p "{quoted}"',
        "llama-server": f"llama-server -m {text_name} --mmproj {mmproj_name} --jinja{extra} "
                        "--host 127.0.0.1 --port 8080",
        "ollama": f"ollama create {name} -f Modelfile && ollama run {name} \"{quoted} ./xray.png\"",
    }


# Ollama's Go-template form of each family's training template (one user turn, then the answer).
OLLAMA_TEMPLATES = {"mistral3": ("[INST]{{ .Prompt }}[/INST]", "</s>"),
                    "qwen2_5_vl": ("<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>")}


def modelfile(text_name: str, mmproj_name: str, family_name: str) -> str:
    """Both files as FROM lines (Ollama's way of importing a vision GGUF with its projector)."""
    template, stop = OLLAMA_TEMPLATES[family_name]
    return (f"# Ollama Modelfile: `ollama create NAME -f Modelfile` in this folder.\nFROM ./{text_name}\n"
            f'FROM ./{mmproj_name}\nTEMPLATE """{template}"""\nPARAMETER stop "{stop}"\nPARAMETER temperature 0\n')


def model_card_section(usage: dict, verification: dict, quant: str, family_name: str) -> str:
    labels = verification.get("labels")
    lines = [
        "## GGUF for llama.cpp and Ollama", "",
        f"`{usage['llama-mtmd-cli'].split()[2]}` holds the language model ({quant.upper()}), "
        f"`{usage['llama-mtmd-cli'].split()[4]}` the vision encoder and projector (F16); llama.cpp needs both. "
        f"Converted with llama.cpp {llamacpp.LLAMA_CPP_COMMIT[:8]} (as vendored in llama-cpp-python "
        f"{llamacpp.LLAMA_CPP_PYTHON_VERSION}); the chat template is in the GGUF, applied with `--jinja`.", "",
        "```bash", usage["llama-mtmd-cli"], usage["llama-server"], usage["ollama"], "```", "",
        f"Checked in llama.cpp against the merged model in transformers on {verification['rows']} images: "
        f"last-position logits differ by at most {verification['max_abs_logit_diff']:.2g} (tolerance "
        f"{verification['tolerance']:.2g}), argmax agreement {verification['argmax_agreement']:.0%}, identical prompt "
        "token counts" + (f", label-scoring agreement {labels['prediction_agreement']:.0%}" if labels else "") + ".",
    ]
    if family_name == "qwen2_5_vl":
        lines += ["", "Qwen2.5-VL in llama.cpp: pass `--image-min-tokens` as above (llama.cpp otherwise gives small "
                  "images at least 8 tokens, transformers fewer); its vision RMS-norm epsilon is fixed in llama.cpp "
                  "(tiny logit differences)."]
    lines += ["", "Ollama: the Modelfile here names both files; Ollama's own engine decides which vision "
              "architectures it runs, so check `ollama run` on one image first."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the export
def _merged_folder(run_dir: Path) -> Path:
    """RUN_DIR/merged, made (and verified) by the merged export when it is missing or incomplete."""
    merged = run_dir / "merged"
    if (merged / "export.json").is_file() and json.loads((merged / "export.json").read_text()).get(
            "verification", {}).get("passed"):
        return merged
    from ..export import export_run

    log.warning("GGUF export: making the merged 16-bit export first (%s)", merged)
    return Path(export_run(run_dir, format="merged-16bit")["path"])


def _merged_base_model(merged: Path, default: str) -> str:
    """The base model the merged weights came from, as merged/unsloth_med.json records it (else the run's)."""
    try:
        return json.loads((merged / "unsloth_med.json").read_text()).get("base_model") or default
    except (OSError, ValueError):
        return default


def export_gguf(run_dir, *, out: str | None = None, quant: str = "f16", threads: int = 2) -> dict:
    """Text GGUF + mmproj GGUF of a finished run, verified in llama.cpp; default destination RUN_DIR/gguf."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..data.images import fit_record, load_image, recorded_buckets
    from ..export.atomic import _AtomicDir, _check_no_secrets, _folder_listing, _recipe_info, _write_json
    from ..export.from_run import _run_info, _run_recipe, _verification_dataset
    from ..export.verify import VERIFY_ROWS, synthetic_rows
    from ..hub import model_card
    from ..models.families import family_of, image_fit

    if quant not in QUANTS:
        raise ExportError(f"Unknown GGUF type '{quant}'. Choose one of {', '.join(QUANTS)}.")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"Run folder {run_dir} does not exist.")
    started = time.time()
    meta, config = _run_info(run_dir)
    check_family(_family_name(_run_family(run_dir, meta["base_model"])))
    recipe = _run_recipe(meta, config)
    merged = _merged_folder(run_dir)
    out_dir = Path(out) if out else run_dir / "gguf"
    name = f"{recipe.name}-{Path(str(meta['base_model'])).name.replace(':', '-')}".replace("_", "-")
    text_name, mmproj_name = file_names(name, quant)

    model = AutoModelForImageTextToText.from_pretrained(merged, dtype="float32", device_map=None).eval()
    processor = AutoProcessor.from_pretrained(merged)
    family = family_of(model.config)
    dataset = _verification_dataset(recipe, config)
    rows = synthetic_rows(recipe, VERIFY_ROWS) if dataset is None or len(dataset) == 0 else \
        [dict(dataset[i]) for i in range(min(VERIFY_ROWS, len(dataset)))]
    # Sized as the run trained (and as the merged export verified): padded into the recorded buckets, if any.
    fit = image_fit(model.config, meta.get("image_size") or recipe.image_size, buckets=recorded_buckets(meta, config))
    images = [load_image(row["image"], fit) for row in rows]
    reference = _hf_reference(model, processor, recipe, images, family)
    bounds = _image_token_bounds(model, processor, images, family.name)
    prompt = _prompt_for_llama(processor, recipe, family.name)
    del model

    with _AtomicDir(out_dir) as tmp:
        timings = convert(merged, tmp / text_name, tmp / mmproj_name, quant)
        check_started = time.time()
        llama = run_in_llama_cpp(tmp / text_name, tmp / mmproj_name, images, prompt, reference.get("answers", []),
                                 bounds, threads=threads)
        verification = compare(reference, llama, quant, family.name, labels=tuple(recipe.labels))
        verification["row_ids"] = [str(r.get("id", i)) for i, r in enumerate(rows)]
        timings["verify_s"] = round(time.time() - check_started, 1)
        log.info("GGUF check: max abs logit diff %.3g (tolerance %.3g), argmax agreement %.2f",
                 verification["max_abs_logit_diff"], verification["tolerance"], verification["argmax_agreement"])
        if not verification["passed"]:
            raise ExportError("The GGUF export disagrees with the merged model in llama.cpp: "
                              + "; ".join(verification["problems"]) + f". Nothing was kept at {out_dir}.")
        instruction = next(c["text"] for c in recipe.prompt()[0]["content"] if c.get("type") == "text")
        usage = usage_lines(text_name, mmproj_name, instruction, bounds, name.lower())
        (tmp / "Modelfile").write_text(modelfile(text_name, mmproj_name, family.name))
        base_model = _merged_base_model(merged, meta["base_model"])
        _write_json(tmp / "unsloth_med.json", {**_recipe_info(recipe, meta.get("model")), "base_model": base_model,
                                               **fit_record(fit), "format": "gguf", "quant": quant})
        gguf = {"quant": quant, "family": family.name, "text_gguf": text_name, "mmproj_gguf": mmproj_name,
                "usage": usage, "image_tokens": bounds, "verification": verification}
        (tmp / "README.md").write_text(model_card(recipe, base_model=base_model, export_format="gguf",
                                                  run_dir=run_dir, image_size=fit_record(fit)["image_size"],
                                                  model_name=meta.get("model"), gguf=gguf))
        files, size = _folder_listing(tmp)
        _check_no_secrets(tmp)
        result = {"format": "gguf", "quant": quant, "family": family.name, "text_gguf": text_name,
                  "mmproj_gguf": mmproj_name, "source": str(merged), "recipe": recipe.name,
                  "base_model": meta["base_model"],
                  "llama_cpp": {"commit": llamacpp.LLAMA_CPP_COMMIT,
                                "llama_cpp_python_sdist": llamacpp.LLAMA_CPP_PYTHON_VERSION},
                  "usage": usage, "image_tokens": bounds, "files": files + ["export.json"], "size_bytes": size,
                  "verification": verification, "timings": timings, "seconds": round(time.time() - started, 1)}
        _write_json(tmp / "export.json", result)
    print(f"GGUF export: {out_dir} ({text_name} + {mmproj_name}; llama.cpp vs transformers max abs logit diff "
          f"{verification['max_abs_logit_diff']:.2e}, argmax agreement {verification['argmax_agreement']:.0%})")
    print("Run it: " + usage["llama-mtmd-cli"])
    return {**result, "path": str(out_dir)}
