"""From the config's values to the recipe a run trains: the generic `classify` / `caption` recipes built from
them, and any recipe's optional overrides (instruction, split settings, VQA columns).

`build_generic_recipe(kind, ...)` (everything as arguments), `resolve_recipe(recipe, values)` (a recipe + the
config -> the recipe to run), `placeholder(kind)`, `is_generic(recipe)`, `record_resolved(config, recipe)`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .base import Recipe, TableSource
from .generic import (
    CAPTION_INSTRUCTION,
    CLASSIFY_INSTRUCTION,
    DEFAULT_MODEL,
    DEFAULT_MODEL_4BIT,
    GENERIC_KINDS,
    TASK_ALIASES,
)

log = logging.getLogger(__name__)

# The config values a recipe may take from the data section; all optional.
CONFIG_FIELDS = ("data_dir", "instruction", "labels", "image_column", "target_column", "target_template",
                 "split_column", "test_fraction", "data_format", "question_column", "answer_column",
                 "answer_type_column", "image_group_column", "drop_duplicates")
VQA_FIELDS = ("question_column", "answer_column", "answer_type_column", "image_group_column")


# ----------------------------------------------------------------------------- building
def parse_labels(labels: Any) -> tuple[str, ...]:
    """Labels from a list/tuple, or a comma-separated string ('a, b, c'); blanks dropped, order kept, no duplicates."""
    if labels is None or labels == "":
        return ()
    if isinstance(labels, str):
        items = labels.split(",")
    elif isinstance(labels, (list, tuple)):
        items = [x for item in labels for x in (str(item).split(",") if len(labels) == 1 else [str(item)])]
    else:
        raise ConfigError("labels must be a list of class names or a comma-separated string "
                          f"(got {type(labels).__name__}).")
    out = tuple(dict.fromkeys(s.strip() for s in items if str(s).strip()))
    return out


def fill_instruction(instruction: str, labels: Sequence[str]) -> str:
    """`{labels}` -> the class list. Other braces are left alone (instructions are free text)."""
    if "{labels}" in instruction:
        if not labels:
            raise ConfigError("The instruction uses {labels} but no labels are known. Pass --labels, or data to read "
                              "them from.")
        instruction = instruction.replace("{labels}", ", ".join(labels))
    return instruction


def _kind(kind: str) -> str:
    key = TASK_ALIASES.get(str(kind).strip().lower())
    if key is None:
        raise ConfigError(f"Unknown generic recipe kind '{kind}': use classify or caption.")
    return key


def build_generic_recipe(kind: str, *, data_source: str | None = None, instruction: str | None = None,
                         labels: Any = None, image_column: str | None = None, target_column: str | None = None,
                         target_template: str | None = None, split_column: str | None = "split",
                         test_fraction: float | None = 0.1, data_format: str | None = "auto",
                         train_split: str = "train", test_split: str = "test", name: str | None = None,
                         default_model: str = DEFAULT_MODEL, default_model_4bit: str = DEFAULT_MODEL_4BIT,
                         image_size: int | None = None, max_new_tokens: int | None = None, attribution: str = "",
                         discover_labels: bool = True, seed: int = 3407,
                         drop_duplicates: bool = False) -> Recipe:
    """A `classify` or `caption` recipe from plain values (see the module docstring for their meaning).

    `data_source` is the default data location (`--data_dir` still overrides it at load time). For
    classification without `labels`, the labels are read from the data (sorted); `discover_labels=False`
    leaves them empty (evaluation then takes them from the test split).
    """
    key = _kind(kind)
    task = GENERIC_KINDS[key]
    test_fraction = 0.1 if test_fraction in (None, "") else float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1 (got {test_fraction}).")
    fmt = (data_format or "auto").strip().lower()
    if fmt not in ("auto", "table", "class_folders", "hf"):
        raise ConfigError(f"data_format '{data_format}' is not one of auto, table, class_folders, hf.")
    source = TableSource(
        kind="auto", id=str(data_source or ""), image_column=image_column or "", target_column=target_column or "",
        train_split=train_split or "train", test_split=test_split or "test", data_format=fmt,
        target_template=target_template or "", split_column=split_column if split_column is not None else "split",
        test_fraction=test_fraction, drop_duplicates=bool(drop_duplicates),
        attribution=attribution or (f"Your own data ({data_source}): state its source, license and credit here."
                                    if data_source else "Your own data: state its source, license and credit here."),
    )
    label_list = parse_labels(labels) if task == "classification" else ()
    if task == "classification" and not label_list and discover_labels and data_source:
        from ..data.tables import discover_labels as discover

        label_list = discover(str(data_source), source=source, seed=seed)
        log.info("classify: %d labels read from %s: %s", len(label_list), data_source, ", ".join(label_list))
    text = instruction or (CLASSIFY_INSTRUCTION if task == "classification" else CAPTION_INSTRUCTION)
    if task == "classification" and label_list:
        text = fill_instruction(text, label_list)
    elif "{labels}" in text and task == "captioning":
        raise ConfigError("The caption recipe has no labels: remove {labels} from the instruction.")
    if max_new_tokens is None:
        max_new_tokens = (max(8, min(48, max(len(label) for label in label_list) // 2 + 6))
                          if label_list else (16 if task == "classification" else 128))
    return Recipe(
        name=name or key, task=task, instruction=text, source=source, default_model=default_model,
        default_model_4bit=default_model_4bit, labels=label_list, image_size=int(image_size or 512),
        max_new_tokens=int(max_new_tokens),
    )


def placeholder(kind: str) -> Recipe:
    """The unconfigured `classify` / `caption` recipe: what `get_recipe(name)` returns before the config is read.

    Its instruction may still hold `{labels}`; `resolve_recipe` turns it into the configured recipe."""
    key = _kind(kind)
    return build_generic_recipe(key, discover_labels=False)


def is_generic(recipe: Recipe) -> bool:
    return recipe.name in GENERIC_KINDS and isinstance(recipe.source, TableSource)


# ----------------------------------------------------------------------------- config values
def _values(config_or_values: Any) -> dict[str, Any]:
    """{field: value} from a Config (its data section), a DataArgs-like object, or a mapping
    (e.g. config.yaml's data)."""
    if config_or_values is None:
        return {}
    data = getattr(config_or_values, "data", config_or_values)
    if isinstance(data, Mapping):
        return {k: data.get(k) for k in CONFIG_FIELDS if k in data}
    return {k: getattr(data, k) for k in CONFIG_FIELDS if hasattr(data, k)}


def resolve_recipe(recipe: Recipe, config_or_values: Any = None, *, seed: int | None = None) -> Recipe:
    """The recipe to run, given the parsed config (or its data section as a mapping).

    - `classify` / `caption` placeholders: built from the data values (data_dir, labels, instruction,
      columns, template, split settings); labels not given are read from data_dir.
    - any other recipe: returned as is, except that a non-empty `instruction` value replaces its
      instruction (`{labels}` filled from the recipe's classes); recipes reading a TableSource also take
      `split_column` and `test_fraction` (vqa recipes: their columns, `image_column`, `drop_duplicates`).
    """
    values = _values(config_or_values)
    if seed is None:
        seed = getattr(getattr(config_or_values, "training", None), "seed", 3407) or 3407
    if is_generic(recipe):
        src = recipe.source
        resolved = build_generic_recipe(
            recipe.name, data_source=values.get("data_dir") or src.id or None,
            instruction=values.get("instruction") or (None if "{labels}" in recipe.instruction
                                                      or recipe.instruction in (CLASSIFY_INSTRUCTION,
                                                                                CAPTION_INSTRUCTION)
                                                      else recipe.instruction),
            labels=values.get("labels") or recipe.labels or None,
            image_column=values.get("image_column") or src.image_column or None,
            target_column=values.get("target_column") or src.target_column or None,
            target_template=values.get("target_template") or src.target_template or None,
            split_column=values["split_column"] if values.get("split_column") is not None else src.split_column,
            test_fraction=values.get("test_fraction") or src.test_fraction,
            data_format=values.get("data_format") or src.data_format,
            train_split=src.train_split, test_split=src.test_split, default_model=recipe.default_model,
            default_model_4bit=recipe.default_model_4bit, image_size=recipe.image_size, seed=seed,
            drop_duplicates=values.get("drop_duplicates") or src.drop_duplicates,
        )
        if resolved.is_classification and not resolved.labels:
            raise ConfigError("The classify recipe needs its classes: pass --data_dir (the labels are read from the "
                              "data) or --labels.")
        return resolved
    instruction = values.get("instruction")
    if instruction:
        recipe = dataclasses.replace(recipe, instruction=fill_instruction(instruction, recipe.labels))
    if isinstance(recipe.source, TableSource):  # table recipes (vqa, product_catalog): data settings from the config
        columns: dict[str, Any] = {}
        if values.get("split_column") is not None:  # '' too: ignore the data's split column
            columns["split_column"] = values["split_column"]
        if values.get("test_fraction"):
            columns["test_fraction"] = float(values["test_fraction"])
        if recipe.is_vqa:  # vqa recipes: columns from the config
            columns.update({k: values[k] for k in VQA_FIELDS if values.get(k)})
            if values.get("image_column"):
                columns["image_column"] = values["image_column"]
            if values.get("drop_duplicates"):
                columns["drop_duplicates"] = True
        if columns:
            recipe = dataclasses.replace(recipe, source=dataclasses.replace(recipe.source, **columns))
    return recipe


def record_resolved(config: Any, recipe: Recipe) -> None:
    """Write the resolved labels and instruction back into config.data (when it has those fields), so the
    run's config.yaml is enough to rebuild the recipe later (predict, evaluate, export)."""
    data = getattr(config, "data", None)
    if data is None:
        return
    if hasattr(data, "labels") and recipe.labels:
        data.labels = list(recipe.labels)
    if hasattr(data, "instruction"):
        data.instruction = recipe.instruction
