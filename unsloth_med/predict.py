"""Use a tuned model: answers for a few images (`predict`), or a test-split evaluation without training.

What can be loaded (`load_for_inference`):

- a run folder: `config.yaml` (written by the pipeline; `run.recipe` and `model.model`, the base
  checkpoint) and `adapter/` (the peft adapter and the processor, plus `adapter/unsloth_med.json`);
- an adapter folder on its own (`adapter_config.json` + `unsloth_med.json` naming the base model);
- a merged model folder (plain transformers weights + processor). Its recipe comes from the
  `unsloth_med.json` beside the weights, which export writes:

      {"recipe": "bone_fracture", "base_model": "...", "image_size": 512,
       "labels": ["...", ...]}      # labels: optional; needed only for recipes without a fixed class list

  or from the `recipe` argument when that file is missing;
- for `evaluate_saved_model` also a hub id or `tiny:<family>` (the recipe must then be named).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

INFO_FILE = "unsloth_med.json"


@dataclass
class Loaded:
    model: Any
    processor: Any
    recipe: Any
    image_size: Any  # the ImageFit the model was trained with (longest side, patch grid, buckets)
    kind: str  # "run", "adapter", "merged" or "checkpoint"
    source: str
    data_dir: str | None = None  # a run's recorded data folder
    config: dict = dataclasses.field(default_factory=dict)  # a run's config.yaml (seed, split), {} for other sources


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}). Re-export the model or remove the file.") from exc


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} cannot be read as YAML ({exc}).") from exc


def _recipe(name: Any, where: str):
    from .recipes import Recipe, get_recipe

    if isinstance(name, Recipe):
        return name
    if not name:
        raise ConfigError(f"No recipe is recorded for {where}. Pass the recipe (--recipe NAME).")
    return get_recipe(str(name))


def _with_labels(recipe, info: dict):
    """Recipes without a fixed class list take the labels recorded at training time; every recipe the generation
    budget the run evaluated with (an export's unsloth_med.json records it)."""
    from .recipes import with_recorded_budget

    if recipe.is_classification and not recipe.labels and info.get("labels"):
        recipe = dataclasses.replace(recipe, labels=tuple(info["labels"]))
    budget = with_recorded_budget(info)
    return dataclasses.replace(recipe, **budget) if budget else recipe


def _model_args(section: dict | None = None):
    from .config import ModelArgs

    known = {f.name for f in dataclasses.fields(ModelArgs)}
    values = {k: v for k, v in (section or {}).items() if k in known}
    # Inference picks its own loading: 4-bit where a GPU is (the default), never a recorded choice the
    # machine cannot honour; and no full fine-tuning flags matter here.
    values.pop("load_in_4bit", None)
    values.pop("backend", None)
    return ModelArgs(**values)


def load_for_inference(model_dir_or_run_dir: str | Path, *, recipe=None, backend: str = "auto") -> Loaded:
    """Model + processor (eval mode) + recipe + image size from a run, adapter, merged or checkpoint source."""
    from .backends import pick_backend
    from .run_lock import refuse_while_training

    source = str(model_dir_or_run_dir)
    path = Path(source)
    refuse_while_training(path, "Evaluate or predict with it")
    data_dir, config = None, {}
    engine = pick_backend(backend)
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "adapter").is_dir():
        config = _read_yaml(path / "config.yaml")
        info = _read_json(path / "adapter" / INFO_FILE)
        rec = _recipe(recipe or (config.get("run") or {}).get("recipe") or info.get("recipe"), source)
        base = (config.get("model") or {}).get("model") or info.get("base_model")
        if not base:
            raise ConfigError(f"{path / 'config.yaml'} names no base model (model.model).")
        if (path / "adapter" / "adapter_config.json").is_file():
            model, processor = engine.load_adapter(base, path / "adapter", _model_args(config.get("model")))
        else:  # a full fine-tune (the offline demo's tiny model) leaves whole weights in adapter/
            model, processor = engine.load(str(path / "adapter"), _model_args(config.get("model")))
        image_size = info.get("image_size") or (config.get("data") or {}).get("image_size") or rec.image_size
        kind, data_dir = "run", (config.get("data") or {}).get("data_dir")
    elif path.is_dir() and (path / "adapter_config.json").is_file():
        info = _read_json(path / INFO_FILE)
        rec = _recipe(recipe or info.get("recipe"), source)
        base = info.get("base_model") or _read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path} names no base model ({INFO_FILE} 'base_model').")
        model, processor = engine.load_adapter(base, path, _model_args())
        image_size, kind = info.get("image_size") or rec.image_size, "adapter"
    elif path.is_dir() and (path / "config.json").is_file():
        info = _read_json(path / INFO_FILE)
        rec = _recipe(recipe or info.get("recipe"), f"{source} (no {INFO_FILE} in it)")
        model, processor = engine.load(source, _model_args())
        image_size, kind = info.get("image_size") or rec.image_size, "merged"
    elif path.exists():
        raise ConfigError(
            f"{source} is neither a run folder (config.yaml + adapter/), an adapter folder (adapter_config.json) "
            "nor a model folder (config.json)."
        )
    else:  # a hub id or tiny:<family>
        from .models import resolve_model_name

        info = {}
        rec = _recipe(recipe, source)
        model, processor = engine.load(resolve_model_name(source, rec, engine.name), _model_args())
        image_size, kind = rec.image_size, "checkpoint"
    model = engine.for_inference(model)
    from .recipes.resolve import resolve_recipe

    recorded = {**info, **((config.get("data") or {}) if kind == "run" else {})}
    rec = resolve_recipe(rec, recorded) if recorded.get("labels") or recorded.get("instruction") else rec
    from .data.images import recorded_buckets
    from .models.families import image_fit

    # The sizing the model was trained with.
    fit = image_fit(model.config, int(image_size), buckets=recorded_buckets(info, config))
    return Loaded(model, processor, _with_labels(rec, info), fit, kind, source, data_dir, config)


def predict(model_dir_or_run_dir: str | Path, images: Sequence[str], *, top_k: int = 3, recipe=None,
            batch_size: int = 8, max_new_tokens: int | None = None, question: str | None = None,
            together: bool = False, fields: dict[str, str] | None = None) -> list[dict]:
    """One answer per image (or, with `together`, one answer about all the images).

    Classification: {"image", "label", "probability", "top": [{"label", "probability"}, ...top_k],
    "probabilities": {every class}}; probabilities come from label scoring and sum to 1 over all classes.
    Captioning: {"image", "caption"}. VQA (`question`): {"image", "question", "answer"}; either with "cut_off_at":
    max_new_tokens when generation stopped the answer there before the model ended it.
    A folder stands for the image files in it. An image that cannot be read gives {"image", "error"} and the others
    are still answered.
    max_new_tokens (default: what the run evaluated with, its eval.max_new_tokens, else the recipe's).
    fields: the value of each other {column} the instruction names (e.g. {"modality": "CT"}), the same for every
    image; a placeholder without one is a ConfigError naming it.
    """
    loaded = model_dir_or_run_dir if isinstance(model_dir_or_run_dir, Loaded) else \
        load_for_inference(model_dir_or_run_dir, recipe=recipe)
    return predict_loaded(loaded, images, top_k=top_k, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          question=question, together=together, fields=fields)


def _in_folders(images: Sequence[str]) -> list[str]:
    """`images` with each folder replaced by the image files in it (sorted; not its sub-folders). A folder used to
    be read as one image and reported as "file not found", though it was there."""
    from .data.sources import image_files

    out: list[str] = []
    for image in images:
        out += [str(p) for p in image_files(Path(str(image)))] or [str(image)]  # an empty folder: reported unread
    return out


def _readable(images: Sequence[str]) -> tuple[list[str], list[dict]]:
    """(images that decode, {"image", "error"} for each one that does not)."""
    from .data.images import IMAGE_EXTENSIONS, load_image
    from .errors import ImageError

    good, bad = [], []
    for image in images:
        if Path(str(image)).is_dir():
            bad.append({"image": str(image), "error": f"a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})"})
            continue
        try:
            load_image(str(image))
            good.append(str(image))
        except (ImageError, OSError) as exc:
            bad.append({"image": str(image), "error": str(exc)})
    return good, bad


def predict_loaded(loaded: Loaded, images: Sequence[str], *, top_k: int = 3, batch_size: int = 8,
                   max_new_tokens: int | None = None, question: str | None = None,
                   together: bool = False, fields: dict[str, str] | None = None) -> list[dict]:
    from .data.samples import placeholders
    from .evaluate.caption import generate_batch
    from .evaluate.classify import score_rows
    from .evaluate.inputs import batches, eval_mode

    rec = loaded.recipe
    if rec.is_vqa and not question:
        raise ConfigError(f"Recipe '{rec.name}' answers questions: pass --question \"...\".")
    fields = {str(name): str(value) for name, value in (fields or {}).items()}
    # The instruction may name other columns of the training data ("Modality: {modality}"): an image alone has no
    # value for them, and an empty one asks the model something it was never trained on.
    unfilled = [name for name in placeholders(rec.instruction)
                if name not in fields and name not in ("image", "id") and not (name == "question" and question)]
    if unfilled:
        raise ConfigError(
            f"The model's instruction names {', '.join('{' + n + '}' for n in unfilled)}, which an image alone does "
            f"not give (instruction: {rec.instruction!r}); left empty, the model is asked what it was never trained "
            "on. Pass the value: "
            + " ".join('--question "..."' if n == "question" else f"--field {n}=VALUE" for n in unfilled) + ".")
    values = {"question": "", **fields, **({"question": question} if question else {})}
    images = _in_folders(images)
    good, results = _readable(images)
    rows = [{**values, "image": str(image), "id": str(image)} for image in good]
    if together and rows:
        rows = [{**values, "image": good[0], "more_images": json.dumps(good[1:]), "id": " + ".join(good)}]
    with torch.inference_mode(), eval_mode(loaded.model):
        for chunk in batches(rows, batch_size):
            if rec.is_classification:
                if not rec.labels:
                    raise ConfigError(f"Recipe '{rec.name}' has no class list; record 'labels' in {INFO_FILE}.")
                probs = score_rows(loaded.model, loaded.processor, rec, chunk, rec.labels,
                                   image_size=loaded.image_size).softmax(dim=-1)
                for row, p in zip(chunk, probs):
                    order = torch.argsort(p, descending=True).tolist()
                    top = [{"label": rec.labels[i], "probability": float(p[i])} for i in order[:max(1, top_k)]]
                    results.append({"image": row["id"], "label": top[0]["label"],  # every image of a --together row
                                    "probability": top[0]["probability"], "top": top,
                                    "probabilities": {rec.labels[i]: float(p[i]) for i in range(len(p))}})
            else:
                budget = max_new_tokens or _recorded_max_new_tokens(loaded)
                answers, _, cut_off = generate_batch(loaded.model, loaded.processor, rec, chunk,
                                                     max_new_tokens=budget, image_size=loaded.image_size)
                key = "answer" if rec.is_vqa else "caption"
                results += [{"image": row["id"], **({"question": question} if rec.is_vqa else {}), key: answer,
                             **({"cut_off_at": budget} if cut else {})}  # the budget ended it, not the model
                            for row, answer, cut in zip(chunk, answers, cut_off)]
    given = {str(image): k for k, image in enumerate(images)}  # in the order given, unreadable ones in their place
    return sorted(results, key=lambda r: given.get(r["image"].split(" + ")[0], len(given)))


def _recorded_eval(loaded: Loaded) -> dict:
    """The run's eval section (config.yaml), {} for other sources."""
    section = loaded.config.get("eval")
    return section if isinstance(section, dict) else {}


def _recorded_max_new_tokens(loaded: Loaded) -> int:
    """The generation budget the run evaluated with (its --max_new_tokens), else the recipe's: a run trained on
    long reports with --max_new_tokens 256 and evaluated again at the recipe's 128 would score cut-off answers."""
    return int(_recorded_eval(loaded).get("max_new_tokens") or loaded.recipe.max_new_tokens)


def _the_runs_examples(test, run_dir: Path):
    """The rows of `test` that the run evaluated (the ids in its eval_after.json, else eval_before.json); all of
    `test`, with a warning, when the run recorded none or none of them are here (other data)."""
    recorded = next((run_dir / name for name in ("eval_after.json", "eval_before.json")
                     if (run_dir / name).is_file()), None)
    if recorded is None:
        return test
    ids = {str(p.get("id")) for p in _read_json(recorded).get("predictions") or ()}
    keep = [i for i, row_id in enumerate(test["id"]) if str(row_id) in ids]
    if not keep:
        log.warning("None of the %d test examples in %s are in this data's test split: evaluating all %d of its "
                    "test examples instead", len(ids), recorded, len(test))
        return test
    if len(keep) < len(ids):
        log.warning("%d of the %d test examples in %s are not in this data's test split: evaluating the %d that "
                    "are", len(ids) - len(keep), len(ids), recorded, len(keep))
    return test.select(keep)


def format_predictions(results: Sequence[dict]) -> str:
    """Plain text for the terminal: one block per image."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['image']}\n  NOT READ: {r['error']}")
            continue
        cut = (f"\n  (cut off at {r['cut_off_at']} new tokens: raise --max_new_tokens for the whole answer)"
               if r.get("cut_off_at") else "")
        if "answer" in r:
            lines.append(f"{r['image']}\n  Q: {r['question']}\n  A: {r['answer']}{cut}")
            continue
        if "caption" in r:
            lines.append(f"{r['image']}\n  {r['caption']}{cut}")
            continue
        lines.append(f"{r['image']}\n  {r['label']}  ({r['probability']:.1%})")
        for alt in r.get("top", [])[1:]:
            lines.append(f"    {alt['label']}  ({alt['probability']:.1%})")
    return "\n".join(lines)


def evaluate_saved_model(model: str, *, recipe_name: str | None = None, data_dir: str | None = None,
                         mode: str | None = None, batch_size: int = 8, max_eval_samples: int | None = None,
                         max_new_tokens: int | None = None, seed: int | None = None, progress: bool = True) -> dict:
    """`unsloth-med evaluate`: a saved model (run / adapter / merged folder, hub id, tiny:<family>) on a
    recipe's test split, without training. Returns evaluate()'s {"metrics", "predictions"}.

    A run folder is evaluated on the test split the run made (its seed, its --split_by, its --test_fraction) and,
    where its eval_*.json names them, on the very examples it evaluated (after --max_eval_samples, unreadable
    images and dropped copies of training images): a split made with other settings would hold training images.
    `seed` (default: the run's, else 3407) makes the split and draws --max_eval_samples. `mode` and
    `max_new_tokens` default to what the run evaluated with (its eval.eval_mode, eval.max_new_tokens), so that the
    same model gives the numbers of its eval_after.json; else label scoring and the recipe's budget."""
    from .data.sources import run_splits, subsample
    from .evaluate import evaluate

    loaded = load_for_inference(model, recipe=recipe_name)
    data_dir = data_dir or loaded.data_dir
    data = loaded.config.get("data") or {}
    if seed is None:
        seed = (loaded.config.get("training") or {}).get("seed", 3407)
    test = run_splits(loaded.recipe, data_dir, seed=seed, split_by=data.get("split_by", "row"),
                      test_fraction=data.get("test_fraction", 0.1))["test"]
    test = subsample(_the_runs_examples(test, Path(model)) if loaded.kind == "run" else test, max_eval_samples, seed)
    recorded = _recorded_eval(loaded)
    mode = mode or recorded.get("eval_mode") or "score"
    result = evaluate(loaded.model, loaded.processor, loaded.recipe, test, mode=mode, batch_size=batch_size,
                      max_new_tokens=max_new_tokens or _recorded_max_new_tokens(loaded), image_size=loaded.image_size,
                      progress=progress)
    result["metrics"]["model"] = loaded.source
    return result
