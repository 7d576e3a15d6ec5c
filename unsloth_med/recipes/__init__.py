"""Built-in recipes, by name. A recipe module exposes RECIPE; see base.py for the interface."""
from __future__ import annotations

import difflib
import importlib

from ..errors import ConfigError
from .base import DataSource, Recipe

BUILTIN = ("bone_fracture", "radiology_caption", "radiology_vqa", "classify", "caption", "vqa", "product_catalog")


GENERIC = ("classify", "caption")  # built from config values (recipes/resolve.py), no RECIPE of their own


def get_recipe(name: str) -> Recipe:
    """A built-in recipe by name, or any importable module path that defines RECIPE.

    `classify` / `caption` come back unconfigured: `resolve.resolve_recipe(recipe, config)` fills them in."""
    if name in GENERIC:
        from .resolve import placeholder

        return placeholder(name)
    module_name = f"{__name__}.{name}" if name in BUILTIN else name
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if not _is_missing(exc, module_name):
            # The module exists but something it imports does not: report that, not a missing recipe.
            raise ConfigError(
                f"Recipe module '{module_name}' was found but failed to import: {type(exc).__name__}: {exc}. "
                "Install what it needs (or fix the import in that module) and run again."
            ) from exc
        module = None
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        close = difflib.get_close_matches(name, BUILTIN, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"Unknown recipe '{name}'.{hint} Built-in recipes: {', '.join(BUILTIN)}. "
            "Or pass an importable module path (e.g. my_pkg.my_recipe) whose module defines RECIPE = Recipe(...)."
        )
    return recipe


def _is_missing(exc: ImportError, module_name: str) -> bool:
    """Whether the ImportError says `module_name` itself (or a package above it) does not exist."""
    missing = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not missing:
        return False
    return module_name == missing or module_name.startswith(missing + ".")


def recipe_record(recipe: Recipe) -> dict:
    """What a run records of the recipe it resolved and trained with (unsloth_med.json): everything a model card
    or a report says about it, so describing the run never needs to import or re-resolve the recipe again."""
    source = recipe.source
    return {"recipe": recipe.name, "task": recipe.task, "instruction": recipe.instruction,
            "labels": list(recipe.labels), "max_new_tokens": recipe.max_new_tokens,
            "data_source": {"kind": source.kind, "id": source.id, "attribution": source.attribution}}


def recorded_recipe(record: dict) -> Recipe:
    """The recipe as `recipe_record` wrote it down (for describing a run; its data loading is not rebuilt)."""
    missing = [key for key in ("recipe", "task", "instruction", "data_source") if key not in record]
    if missing:
        raise ConfigError(f"The run's record of its recipe lacks {', '.join(missing)}: it was written by an older "
                          "unsloth-med. Export the run again (unsloth-med export RUN_DIR) to record it.")
    source = record["data_source"] or {}
    return Recipe(name=record["recipe"], task=record["task"], instruction=record["instruction"],
                  source=DataSource(kind=source.get("kind", ""), id=source.get("id", ""),
                                    attribution=source.get("attribution", "")),
                  default_model=record.get("base_model", ""), labels=tuple(record.get("labels") or ()),
                  **with_recorded_budget(record))


def with_recorded_budget(record: dict) -> dict:
    """{"max_new_tokens": N} as a run recorded its generation budget (its --max_new_tokens, else its recipe's); {}
    for records written before session 20."""
    budget = record.get("max_new_tokens")
    return {"max_new_tokens": int(budget)} if isinstance(budget, int) and budget > 0 else {}


__all__ = ["BUILTIN", "DataSource", "Recipe", "get_recipe", "recipe_record", "recorded_recipe", "with_recorded_budget"]
