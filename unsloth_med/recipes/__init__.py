"""Built-in recipes, by name. A recipe module exposes RECIPE; see base.py for the interface."""
from __future__ import annotations

import difflib
import importlib

from ..errors import ConfigError
from .base import DataSource, Recipe

BUILTIN = ("bone_fracture", "radiology_caption", "radiology_vqa", "classify", "caption", "vqa", "product_catalog")


GENERIC = ("classify", "caption")  # built from config values (recipes/generic.py), no module of their own


def get_recipe(name: str) -> Recipe:
    """A built-in recipe by name, or any importable module path that defines RECIPE.

    `classify` / `caption` come back unconfigured: `generic.resolve_recipe(recipe, config)` fills them in."""
    if name in GENERIC:
        from .generic import placeholder

        return placeholder(name)
    module_name = f"{__name__}.{name}" if name in BUILTIN else name
    try:
        module = importlib.import_module(module_name)
    except ImportError:
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


__all__ = ["BUILTIN", "DataSource", "Recipe", "get_recipe"]
