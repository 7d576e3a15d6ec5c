"""Model cards and the Hugging Face Hub.

`model_card` writes the README.md of an exported folder: YAML metadata the Hub reads (base_model,
datasets, tags, license, pipeline_tag), then the recipe, the training config, the before/after
metrics of the run, the dataset's attribution and the medical disclaimer.

`push` uploads an exported folder (never a run folder) with `huggingface_hub` (`create_repo` + one
`create_commit`), private by default, never into an existing public repo unless --public; the Hub's copy of its
records leaves out the test images' file names and shortens this machine's paths (`push`'s docstring).
The token comes from the run's `--hub_token` (secrets.given_hub_token), else HF_TOKEN or the
user's `hf auth login`; this module never reads it into a message, a log line or a file. Without network
it raises NetworkError saying the export is saved locally and how to push it later.

    unsloth-med push DIR OWNER/NAME [--public]
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .data.images import recorded_buckets
from .errors import ConfigError, CredentialsError, ExportError, NetworkError
from .secrets import given_hub_token, redact, secret_values

log = logging.getLogger(__name__)

DISCLAIMER = (
    "**Medical disclaimer.** This model is for educational and research use only. It is not a medical "
    "device and has not been clinically validated. Do not use it for diagnosis, clinical decision-making "
    "or patient care; its answers can be wrong with high confidence. Any clinical question belongs to a "
    "qualified professional."
)

# Licenses of the base models the built-in recipes use (a fine-tune inherits its base model's license).
KNOWN_LICENSES = (
    (re.compile(r"ministral-3", re.I), "apache-2.0"),
    (re.compile(r"llama-3\.2", re.I), "llama3.2"),
    (re.compile(r"gemma-3", re.I), "gemma"),
)

# Training options worth showing on a card (the full resolved config stays in the run's config.yaml).
CARD_TRAINING_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "optim", "bf16", "fp16", "seed",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- model card
def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(_HUB_ID.match(str(name))) and not Path(str(name)).exists()


def base_model_license(base_model: str | None) -> str:
    """The base model's license id: from its card when it is on disk (local folder or HF cache), else known ones."""
    card = None
    if base_model and Path(base_model, "README.md").is_file():
        card = Path(base_model, "README.md")
    elif _is_hub_id(base_model):
        try:
            from huggingface_hub import hf_hub_download

            card = Path(hf_hub_download(base_model, "README.md", local_files_only=True))
        except Exception:  # not in the cache: no network lookups for a card
            card = None
    if card is not None:
        try:
            text = card.read_text(errors="replace")
            if text.startswith("---"):
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                if isinstance(meta, dict) and meta.get("license"):
                    return str(meta["license"])
        except (OSError, yaml.YAMLError, IndexError):
            pass
    for pattern, license_id in KNOWN_LICENSES:
        if base_model and pattern.search(str(base_model)):
            return license_id
    return "other"


def read_run_metrics(run_dir: str | Path | None) -> dict | None:
    """{'before': {...}, 'after': {...}, ...} from the run's metrics.json, else from eval_before/after.json."""
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("Could not read %s for the model card", path)
    metrics: dict[str, Any] = {}
    for key in ("before", "after"):
        part = run_dir / f"eval_{key}.json"
        if part.is_file():
            try:
                metrics[key] = json.loads(part.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("Could not read %s for the model card", part)
    return metrics or None


def read_run_config(run_dir: str | Path | None) -> dict | None:
    if run_dir is None or not Path(run_dir, "config.yaml").is_file():
        return None
    try:
        config = yaml.safe_load(Path(run_dir, "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if not _number(value):
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


_COUNT_KEYS = (("n_test", "test examples"), ("test_size", "test examples"), ("n", "test examples"),
               ("num_examples", "test examples"), ("mode", "evaluation mode"), ("eval_mode", "evaluation mode"))


def _scores(part: Any) -> dict:
    """One evaluation's metrics: metrics.json's `before`/`after`, or an eval_*.json ({metrics, predictions})."""
    if not isinstance(part, dict):
        return {}
    return part["metrics"] if isinstance(part.get("metrics"), dict) else part


def _metrics_section(metrics: dict | None) -> list[str]:
    before, after = _scores((metrics or {}).get("before")), _scores((metrics or {}).get("after"))
    if not (before or after):
        return ["No evaluation metrics were recorded for this run."]
    counts = {name for name, _ in _COUNT_KEYS}
    keys = [k for k in dict.fromkeys([*before, *after])
            if k not in counts and (_number(before.get(k)) or _number(after.get(k)))]
    lines = ["Evaluated on the recipe's held-out test split: the base model before training, "
             "the tuned model after.", ""]
    shown = set()
    for key, label in _COUNT_KEYS:
        value = metrics.get(key, after.get(key, before.get(key)))
        if label not in shown and value is not None and not isinstance(value, (dict, list)):
            lines.append(f"- {label}: {value}")
            shown.add(label)
    if shown:
        lines.append("")
    lines += ["| metric | before (base model) | after (fine-tuned) |", "|---|---|---|"]
    lines += [f"| {k} | {_cell(before, k)} | {_cell(after, k)} |" for k in keys]
    if any(_interval(side, k) for side in (before, after) for k in keys):
        lines += ["", "In brackets: 95% intervals (Wilson for accuracy, a bootstrap over the test examples for "
                      "macro-F1); the test split is small, so read differences inside them as chance."]
    return lines


def _interval(scores: dict, key: str) -> list | None:
    """The evaluation's 95% interval of `key` (`<key>_ci95`, evaluate/uncertainty.py), when it has one."""
    ci = scores.get(f"{key}_ci95")
    return ci if isinstance(ci, list) and len(ci) == 2 and all(_number(x) for x in ci) else None


def _cell(scores: dict, key: str) -> str:
    ci = _interval(scores, key)
    return _fmt(scores.get(key)) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and _number(scores.get(key)) else "")


def _config_section(config: dict | None) -> str | None:
    if not config:
        return None
    shown: dict[str, Any] = {}
    model = config.get("model") or {}
    shown["model"] = {k: model[k] for k in ("backend", "load_in_4bit", "max_seq_length", "full_finetune") if k in model}
    if config.get("lora") and not model.get("full_finetune"):
        shown["lora"] = dict(config["lora"])
    data = config.get("data") or {}
    shown["data"] = {k: data[k] for k in ("image_size", "max_train_samples", "max_eval_samples")
                     if data.get(k) is not None}
    training = config.get("training") or {}
    shown["training"] = {k: training[k] for k in CARD_TRAINING_KEYS if k in training}
    shown = {k: v for k, v in shown.items() if v}
    return yaml.safe_dump(shown, sort_keys=False).strip() if shown else None


def model_card(recipe, *, base_model: str, export_format: str = "merged-16bit", run_dir: str | Path | None = None,
               metrics: dict | None = None, config: dict | None = None, image_size: int | None = None,
               verification: dict | None = None, license: str | None = None, repo_id: str | None = None,
               weights: str | None = None, model_name: str | None = None, gguf: dict | None = None) -> str:
    """README.md text for an exported folder (merged 16-bit weights, a LoRA adapter, or GGUF).

    `weights`: what a merged-format export holds, as export.json words it (e.g. a full fine-tune in float32);
    `model_name`: the model as the user named it (default `base_model`, the checkpoint that was loaded);
    `gguf`: for export_format "gguf", the GGUF export's record (export.json: quant, family, usage, verification):
    the card then tells how to run the files in llama.cpp and Ollama instead of loading them with transformers.

    `metrics` and `config` default to the run folder's metrics.json (or eval_before/eval_after.json)
    and config.yaml. The text passes through `redact`, so no secret can reach the card.
    """
    metrics = metrics if metrics is not None else read_run_metrics(run_dir)
    config = config if config is not None else read_run_config(run_dir)
    source = getattr(recipe, "source", None)
    adapter = export_format == "adapter"
    is_gguf = export_format == "gguf"
    if is_gguf and not gguf:
        raise ValueError("model_card(export_format='gguf') needs the GGUF export's record (gguf=...)")
    name = getattr(recipe, "name", "custom")

    named = model_name or base_model
    meta: dict[str, Any] = {}
    if _is_hub_id(named):
        meta["base_model"] = named
    elif _is_hub_id(base_model):
        meta["base_model"] = base_model
    if not is_gguf:  # the Hub reads a GGUF repo's files itself; no Python library loads them
        meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "image-text-to-text"
    meta["license"] = license or base_model_license(named if _is_hub_id(named) else base_model)
    if source is not None and source.kind == "hf" and _is_hub_id(source.id):
        meta["datasets"] = [source.id]
    tags = ["unsloth-med", "unsloth", "medical", "medical-imaging", "vision-language-model", "image-text-to-text",
            "trl", "sft", "lora" if adapter else "merged-lora", name.replace("_", "-")]
    if is_gguf:
        tags[1:1] = ["gguf", "llama.cpp"]
    meta["tags"] = list(dict.fromkeys(tags))

    title = repo_id.split("/")[-1] if repo_id else f"{name} fine-tune of {Path(str(named)).name}"
    if adapter:
        what = "a LoRA adapter (load it on top of the base model with peft)"
    elif is_gguf:
        what = (f"GGUF for llama.cpp and Ollama: the language model ({str(gguf.get('quant', 'f16')).upper()}) and "
                "its vision encoder and projector (mmproj, F16), converted from the merged weights")
    else:
        merged = weights or "merged 16-bit weights (the LoRA adapter folded into the base model)"
        what = f"{merged}; loads with plain transformers"
    loadable = named if _is_hub_id(named) else base_model  # a name from_pretrained accepts
    tiny = " (a tiny random-weight model that unsloth-med builds offline)" if str(named).startswith("tiny:") else ""
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"A fine-tune of `{named}`{tiny} for the **{name}** recipe of unsloth-med (Unsloth / transformers, "
             f"TRL and PEFT), exported as {what}.", "",
             f"> {DISCLAIMER}", ""]

    lines += ["## Task", ""]
    if recipe is not None:
        kind = getattr(recipe, "task", "")
        lines.append(f"- Recipe: `{name}` ({kind})")
        if getattr(recipe, "labels", ()):
            lines.append(f"- Classes ({len(recipe.labels)}): " + ", ".join(recipe.labels))
        lines.append(f"- Instruction given with each image: \"{recipe.instruction}\"")
    size = image_size or (((config or {}).get("data") or {}).get("image_size")) or getattr(recipe, "image_size", None)
    if size and recorded_buckets(None, config):
        how = ("give llama.cpp images sized the same way (the llama.cpp check below did)" if is_gguf
               else "size images the same way at inference (`unsloth-med predict` does)")
        lines.append(f"- Images were scaled so the longest side is {size} px (down to the vision patch grid) "
                     f"and padded with black into the nearest fixed shape (square, 3:4, 1:2, 1:3); {how}.")
    elif size:
        lines.append(f"- Images are resized so the longest side is at most {size} px; use the same size at inference.")
    lines.append("")

    lines += ["## Results", "", *_metrics_section(metrics), ""]

    cfg = _config_section(config)
    if cfg:
        lines += ["## Training configuration", "", "```yaml", cfg, "```", ""]

    lines += ["## Dataset", ""]
    if source is not None and source.id:
        lines.append(f"Source: `{source.id}` ({source.kind}).")
    lines.append(getattr(source, "attribution", "") or "See the dataset's own card or page for its license and terms.")
    lines.append("")

    if is_gguf:
        lines += _gguf_usage(gguf, repo_id)
    else:
        lines += _python_usage(recipe, adapter=adapter, target=repo_id or "PATH_OR_REPO", loadable=loadable,
                               size=size)

    if verification and not is_gguf:  # a GGUF card's usage section says how llama.cpp was checked
        lines += ["## Export check", "", _verification_text(verification), ""]

    # Only a recipe's published dataset is "public": not the user's own data, nor the demo's generated images.
    public = source is not None and bool(source.id) and source.kind in ("hf", "kaggle_folders") and \
        not Path(str(source.id)).is_absolute()
    lines += ["## Limitations", "",
              f"- Trained and evaluated on one {'public ' if public else ''}dataset; performance on other hospitals, "
              "scanners, populations or image types is unknown.",
              "- Test-set numbers above are only as good as the test split (see the dataset attribution for its "
              "provenance).",
              f"- {DISCLAIMER}", ""]
    return redact("\n".join(lines))


def _gguf_usage(gguf: dict, repo_id: str | None) -> list[str]:
    """The GGUF card's usage: llama-mtmd-cli, llama-server and Ollama lines, and what the llama.cpp check found."""
    from .gguf.export import model_card_section

    family = gguf.get("family") or ("qwen2_5_vl" if gguf.get("image_tokens") else "mistral3")
    heading, body = model_card_section(gguf["usage"], gguf["verification"], str(gguf.get("quant", "f16")),
                                       family).split("\n\n", 1)
    download = []
    if repo_id and gguf.get("text_gguf") and gguf.get("mmproj_gguf"):
        download = [f"Download both files (and the Modelfile): `hf download {repo_id} {gguf['text_gguf']} "
                    f"{gguf['mmproj_gguf']} Modelfile --local-dir .`", ""]
    return [heading, "", *download, body]


def _python_usage(recipe, *, adapter: bool, target: str, loadable: str, size) -> list[str]:
    """The transformers (and peft) snippet of a merged or adapter card."""
    instruction = getattr(recipe, "instruction", "Describe this image.")
    lines = ["## Usage", "", "```python", "from PIL import Image",
             "from transformers import AutoModelForImageTextToText, AutoProcessor"]
    if adapter:
        lines += ["from peft import PeftModel", "",
                  f'processor = AutoProcessor.from_pretrained("{target}")',
                  f'base = AutoModelForImageTextToText.from_pretrained("{loadable}", dtype="auto")',
                  f'model = PeftModel.from_pretrained(base, "{target}")']
    else:
        lines += ["", f'processor = AutoProcessor.from_pretrained("{target}")',
                  f'model = AutoModelForImageTextToText.from_pretrained("{target}", dtype="auto")']
    lines += ['image = Image.open("xray.png").convert("RGB")' + (f"  # longest side <= {size} px" if size else ""),
              f"instruction = {json.dumps(instruction)}",
              'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]',
              "text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
              'inputs = processor(images=[[image]], text=[text], add_special_tokens=False, return_tensors="pt")',
              "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)",
              'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", "",
              "The processor carries the chat template the model was trained with; "
              "keep it (and the instruction above).", ""]
    return lines


def _verification_text(verification: dict) -> str:
    """The card's account of the reload check: what was compared and found, or that nothing could be compared."""
    if verification.get("status") == "not verified":
        return (f"**Not verified.** The folder was reloaded with plain transformers, but {verification.get('reason')}. "
                "Check its answers yourself before relying on it.")

    def num(key: str) -> str:
        value = verification.get(key)
        return f"{value:.2g}" if _number(value) else "?"

    agree, rows = verification.get("greedy_agreement"), verification.get("rows", "?")
    agreeing = round(agree * rows) if _number(agree) and _number(rows) else "?"
    ties = sum(bool(d.get("near_tie")) for d in verification.get("greedy_disagreements") or ())
    return (f"After export the folder was reloaded with plain transformers ({verification.get('dtype', '?')}) and "
            f"compared with {verification.get('reference', 'the tuned model')} on {rows} test images: max abs logit "
            f"difference {num('max_abs_logit_diff')} (tolerance {num('tolerance')}); the greedy answers agree on "
            f"{agreeing} of {rows}" + (f" ({ties} differ from a near-tie on)" if ties else "")
            + f". Result: {verification.get('status', 'passed' if verification.get('passed') else 'failed')}.")


def write_model_card(folder: str | Path, *, run_dir: str | Path | None = None, repo_id: str | None = None) -> Path:
    """(Re)write folder/README.md from its unsloth_med.json (+ export.json) and the run's metrics, atomically.

    Useful after the run's metrics.json exists (the pipeline exports before it writes the report). Works for
    merged, adapter and GGUF exports (a GGUF card has the llama.cpp / Ollama usage, not transformers').
    """
    from .recipes import get_recipe, recorded_recipe

    folder = Path(folder)
    export = json.loads((folder / "export.json").read_text()) if (folder / "export.json").is_file() else {}
    info = _export_info(folder, export)
    if "data_source" in info:  # the recipe as the run resolved it: instruction, labels, data actually used
        recipe = recorded_recipe(info)
    else:  # written by an older unsloth-med: rebuild it from the run's config; say why when that fails
        from .recipes.resolve import resolve_recipe

        try:
            recipe = resolve_recipe(get_recipe(info["recipe"]), {**((read_run_config(run_dir) or {}).get("data") or {}),
                                                                 **{k: info[k] for k in ("labels", "instruction")
                                                                    if info.get(k)}})
        except ConfigError as exc:
            raise ExportError(f"Could not rebuild the recipe of {folder} for its model card: {exc}. Export the run "
                              "again (unsloth-med export RUN_DIR), which records the recipe in the export.") from exc
    export_format = info.get("format", "merged-16bit")
    text = model_card(recipe, base_model=info.get("base_model", "?"), export_format=export_format,
                      run_dir=run_dir, image_size=info.get("image_size"), verification=export.get("verification"),
                      repo_id=repo_id, weights=export.get("weights"), model_name=info.get("model"),
                      gguf=export if export_format == "gguf" else None)
    tmp = folder / ".README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / "README.md")
    return folder / "README.md"


def _export_info(folder: Path, export: dict) -> dict:
    """The export's unsloth_med.json; for a GGUF folder written before GGUF exports carried one, its source's
    (the merged folder it was converted from)."""
    if (folder / "unsloth_med.json").is_file():
        return json.loads((folder / "unsloth_med.json").read_text())
    if export.get("format") == "gguf":
        source = Path(str(export.get("source", "")), "unsloth_med.json")
        if source.is_file():
            return {**json.loads(source.read_text()), "format": "gguf"}
        raise ExportError(f"{folder} is a GGUF export without unsloth_med.json, and {source} (the merged folder it "
                          "was converted from) is gone, so its model card cannot be written. Export the run again: "
                          "unsloth-med export RUN_DIR --format gguf")
    raise ExportError(f"{folder} has no unsloth_med.json: it is not a folder unsloth-med exported. Export the run "
                      "first: unsloth-med export RUN_DIR --format merged-16bit|adapter|gguf")


# ----------------------------------------------------------------------------- secrets check
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def files_with_secrets(folder: str | Path, values: list[str] | None = None) -> list[str]:
    """Files under `folder` that contain a secret value: of a secret environment variable, of a secret option on
    the command line (--hub_token) or of one taken from the run's options (secrets.secret_values).

    Weight files are checked in their header only (safetensors metadata), the rest in full.
    """
    values = [v.encode() for v in (secret_values() if values is None else values) if v]
    if not values:
        return []
    hits = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        if path.suffix in _WEIGHT_SUFFIXES:
            with path.open("rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if path.suffix == ".safetensors" and len(head) == 8 else 0
                data = fh.read(min(n, 100_000_000)) if n else b""
        else:
            data = path.read_bytes()
        if any(v in data for v in values):
            hits.append(str(path.relative_to(folder)))
    return hits


# ----------------------------------------------------------------------------- push
def check_repo_id(repo_id: str | None) -> None:
    """ConfigError unless `repo_id` is an OWNER/NAME the Hub accepts (huggingface_hub's own rules: no '--' or '..',
    at most 96 characters, ...). Cheap and offline: check it before the work whose result is to be pushed."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not _HUB_ID.match(repo_id or ""):
        raise ConfigError(f"'{repo_id}' is not a Hub repo id. Use OWNER/NAME, e.g. my-user/bone-fracture-ministral3.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"'{repo_id}' is not a valid Hub repo id: {exc} Use OWNER/NAME, e.g. "
                          "my-user/bone-fracture-ministral3.") from None


# Keys of an export's records that name the user's test images (their file names can carry patient ids): kept in
# the local export.json, left out of the copy the Hub gets.
PRIVATE_RECORD_KEYS = ("row_ids",)
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".yaml", ".yml")
# A tokenizer's vocabulary goes up as it is: its tokens are text, and large vocabularies hold path-like tokens
# ("/root", "/data"); shortened, the Hub's tokenizer maps them to other ids than the model was trained with.
_VOCABULARIES = ("tokenizer.json", "tekken.json", "vocab.json", "merges.txt", "vocab.txt")


def _path_pattern(path: str) -> re.Pattern:
    """`path` as a whole path: /home/alice, not /home/alice2 nor /mnt/home/alice."""
    return re.compile(r"(?<![\w.-])" + re.escape(path) + r"(?![\w.-])")


def _local_paths(folder: Path) -> list[str]:
    """Absolute paths of this machine that the export's records name (the data folder, a local base model, the
    merged folder a GGUF came from): the Hub copy shows their last part only."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and os.path.isabs(value) and len(Path(value).parts) > 1:
            found.add(value.rstrip("/"))

    for name in ("unsloth_med.json", "export.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        walk({k: v for k, v in data.items() if k not in ("files", "verification", "usage")})
    return sorted(found, key=len, reverse=True)


def _public_bytes(path: Path, local_paths: list[str]) -> tuple[bytes | None, list[str]]:
    """What the Hub gets of a text file of the export, when it differs from the file: local paths shortened to
    their last part, the home folder (a user name) to '~', and in JSON records the keys of PRIVATE_RECORD_KEYS
    dropped. (None, []) when the file goes up as it is."""
    if path.suffix not in _TEXT_SUFFIXES or path.name in _VOCABULARIES or path.stat().st_size > 20_000_000:
        return None, []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None, []
    changed: list[str] = []
    if path.suffix == ".json" and any(f'"{key}"' in text for key in PRIVATE_RECORD_KEYS):
        try:
            data = json.loads(text)
        except ValueError:
            data = None

        def drop(value: Any) -> Any:
            if isinstance(value, dict):
                for key in PRIVATE_RECORD_KEYS:
                    if value.pop(key, None) is not None:
                        changed.append(key)
                return {k: drop(v) for k, v in value.items()}
            return [drop(v) for v in value] if isinstance(value, list) else value

        if isinstance(data, dict):
            data = drop(data)
            text = json.dumps(data, indent=1)
    for local in local_paths:
        at_local = _path_pattern(local)
        if at_local.search(text):
            text = at_local.sub(lambda _: Path(local).name, text)
            changed.append("local paths")
    home = str(Path.home()).rstrip("/")
    if len(Path(home).parts) > 1:
        at_home = _path_pattern(home)
        if at_home.search(text):
            text = at_home.sub("~", text)
            changed.append("home folder")
    return (text.encode(), list(dict.fromkeys(changed))) if changed else (None, [])


def _push_later(folder: Path, repo_id: str, private: bool) -> str:
    return (f"The export is saved locally in {folder}. Push it later with: "
            f"unsloth-med push {folder} {repo_id}" + ("" if private else " --public"))


def push(folder: str | Path, repo_id: str, *, private: bool = True) -> str:
    """Upload an exported folder to the Hub repo `repo_id` (created if missing, private by default) in one commit;
    returns its URL.

    Only an export is uploaded (a folder with export.json): a run folder holds the training images (samples.png),
    the test predictions with image file names, logs and checkpoints. What the Hub gets differs from the folder in
    its records only: export.json without the ids (file names) of the test images the export check used, and
    absolute paths of this machine shortened to their last part (the home folder to '~'). A repo that exists keeps
    its visibility, so pushing without `--public` into an existing public repo is refused before any upload.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ExportError(f"{folder} is not an exported folder (missing or empty). Export first: "
                          "unsloth-med export RUN_DIR --format merged-16bit|adapter|gguf")
    if not (folder / "export.json").is_file():
        what = (" It is a run folder: it holds training images (samples.png), the test predictions with image file "
                "names, logs and checkpoints, none of which belongs on the Hub."
                if (folder / "run.json").is_file() or (folder / "adapter" / "unsloth_med.json").is_file() else "")
        raise ExportError(f"Refusing to upload {folder}: it has no export.json, so it is not a folder unsloth-med "
                          f"exported.{what} Export first and push the export: unsloth-med export RUN_DIR --format "
                          f"merged-16bit|adapter|gguf --push-to-hub {repo_id}")
    if not (folder / "README.md").is_file():
        log.warning("%s has no README.md: the Hub repo will have no model card (and no medical disclaimer)", folder)
    leaked = files_with_secrets(folder)
    if leaked:
        raise ExportError(f"Refusing to upload {folder}: these files contain the value of a secret (an environment "
                          f"variable or a token option): {', '.join(leaked)}. Remove it from them first.")

    import huggingface_hub
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise NetworkError("HF_HUB_OFFLINE is set, so nothing can be uploaded. "
                           + _push_later(folder, repo_id, private))
    token = given_hub_token()  # the run's --hub_token; None: HF_TOKEN or `hf auth login`, as huggingface_hub finds
    if not (token or huggingface_hub.get_token()):
        raise CredentialsError("No Hugging Face token found. Set HF_TOKEN (a token with write access, from "
                               "https://huggingface.co/settings/tokens) or run `hf auth login`. "
                               + _push_later(folder, repo_id, private))
    operations, local_paths = [], _local_paths(folder)
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):  # partial files, caches
            continue
        public, changed = _public_bytes(path, local_paths)
        if changed:
            log.info("The Hub gets %s without %s", relative.as_posix(), ", ".join(
                {"row_ids": "the file names of the test images the export check used", "local paths":
                 "this machine's paths (shortened to their last part)", "home folder": "your home folder's path"}[c]
                for c in changed))
        operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(),
                                             path_or_fileobj=public if public is not None else str(path)))
    # HF_ENDPOINT is read now (huggingface_hub reads it once, at import).
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    network_errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:
        import httpx

        network_errors += (httpx.TransportError,)
    except ImportError:
        pass
    try:
        import requests

        network_errors += (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:
        pass
    try:
        from huggingface_hub.errors import OfflineModeIsEnabled

        network_errors += (OfflineModeIsEnabled,)
    except ImportError:
        pass
    created = False
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        created = True
        # An existing repo keeps its visibility whatever `private` says (create_repo ignores it then).
        is_private = getattr(api.repo_info(repo_id, repo_type="model"), "private", None)
        if private and is_private is False:
            raise ExportError(f"{repo_id} exists and is PUBLIC; this push was to be private, so nothing was uploaded. "
                              f"Make the repo private on the Hub (its Settings), push to a new repo, or pass --public "
                              f"to publish {folder} there.")
        if not private and is_private:
            log.warning("%s exists and is private: it stays private (--public only sets a new repo's visibility)",
                        repo_id)
        api.create_commit(repo_id, operations, commit_message="Upload with unsloth-med", repo_type="model")
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise CredentialsError(
                f"The Hub refused the upload to {repo_id} (HTTP {status}): the token is invalid or lacks write access "
                f"to '{repo_id.split('/')[0]}'. Use a write token (HF_TOKEN or `hf auth login`). "
                + _push_later(folder, repo_id, private)) from None
        raise ExportError(f"Upload to {repo_id} failed: {redact(str(exc))[:300]}. " + _nothing_committed(created)
                          + _push_later(folder, repo_id, private)) from None
    except network_errors as exc:
        raise NetworkError(f"Could not reach the Hugging Face Hub ({type(exc).__name__}: {redact(str(exc))[:200]}). "
                           + _nothing_committed(created) + _push_later(folder, repo_id, private)) from None
    url = str(url)
    log.info("Pushed %s to %s (%s)", folder, url, "visibility unknown" if is_private is None
             else "private" if is_private else "public")
    return url


def _nothing_committed(created: bool) -> str:
    """A push is one commit: when it fails, none of the files is in the repo (which exists from then on, if made)."""
    return ("The repo exists, but no file of this push was committed to it (a push is one commit). " if created
            else "")
