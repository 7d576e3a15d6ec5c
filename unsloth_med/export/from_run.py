"""`export_run`: any export format from a finished run folder (its adapter, config and recorded sizing)."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ..data.images import recorded_buckets
from ..errors import ExportError, UnslothMedError
from ..models.families import image_fit
from .adapter import export_adapter
from .merge import export_merged

log = logging.getLogger(__name__)


FORMATS = ("merged-16bit", "adapter", "gguf")


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
    from ..recipes import get_recipe, recorded_recipe, with_recorded_budget

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
        from ..recipes.resolve import resolve_recipe
    except ImportError:
        return recipe
    try:
        recipe = resolve_recipe(recipe, values)
    except UnslothMedError as exc:
        raise ExportError(f"Could not rebuild the run's recipe '{meta['recipe']}' from its config.yaml: {exc}") from exc
    # An export evaluates as the run did: config.yaml's --max_new_tokens first, which runs recorded before the adapter's
    # unsloth_med.json did (that one then holds the recipe's default).
    run_eval = config.get("eval") if isinstance(config.get("eval"), dict) else {}
    recipe = dataclasses.replace(recipe, **with_recorded_budget(run_eval) or with_recorded_budget(meta))
    recorded = meta.get("data_source")
    if recorded:  # the data the run actually used (e.g. the demo's generated images, not the recipe's download)
        recipe = dataclasses.replace(recipe, source=dataclasses.replace(
            recipe.source, id=recorded.get("id", ""), attribution=recorded.get("attribution", "")))
    return recipe


def _model_args(config: dict):
    from ..config import ModelArgs

    section = config.get("model") or {}
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in section.items() if k in names})


def _verification_dataset(recipe, config: dict):
    """The run's test rows when its data is on disk here; otherwise generated images."""
    data_dir = (config.get("data") or {}).get("data_dir")
    if data_dir and Path(data_dir).exists():
        try:
            from ..data.sources import load_recipe_data

            return load_recipe_data(recipe, data_dir, seed=(config.get("training") or {}).get("seed", 3407))["test"]
        except UnslothMedError as exc:
            log.warning("Could not load the run's test data for the export check (%s): using generated images", exc)
    return None


def export_run(run_dir, *, format: str = "merged-16bit", out: str | None = None, backend: str | None = None,
               quant: str = "f16") -> dict:
    """Export a finished run folder: `adapter` (copy + card) or `merged-16bit` (base + adapter, merged, verified).

    Default destinations: RUN_DIR/merged and RUN_DIR/adapter-export.
    """
    from ..backends import pick_backend

    if format not in FORMATS:
        raise ExportError(f"Unknown export format '{format}'. Choose {' or '.join(FORMATS)}.")
    if format == "gguf":  # llama.cpp text + mmproj GGUF from the merged weights: unsloth_med/gguf/
        from ..gguf import export_gguf

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
                              base_model=base_model, image_size=image_size,
                              image_buckets=recorded_buckets(meta, config), run_dir=run_dir,
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
