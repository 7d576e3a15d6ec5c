"""Adapter export: the LoRA adapter, processor, unsloth_med.json and a model card, copied atomically."""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from ..disk import folder_bytes
from ..errors import ExportError
from .atomic import _AtomicDir, _check_no_secrets, _folder_listing, _recipe_info, _write_json

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- adapter export
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_adapter(adapter_dir, out_dir, *, recipe, base_model: str, image_size, image_buckets: bool = False,
                   run_dir=None, model_name: str | None = None) -> dict:
    """Copy a run's adapter (+ processor) into out_dir with a model card; check it reloads. Atomic.
    `image_buckets`: whether the run padded its images into fixed shapes (recorded, so that predict and evaluate
    on the export size images as training did)."""
    from peft import PeftConfig
    from transformers import AutoProcessor

    from ..hub import model_card

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
                "image_buckets": bool(image_buckets), "format": "adapter"}
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
