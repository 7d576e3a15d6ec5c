"""Model families, tiny offline models, and prompt encoding."""
from __future__ import annotations


def resolve_model_name(name: str | None, recipe, backend_name: str) -> str:
    """The checkpoint to load: tiny:<family> builds a tiny offline model; None means the recipe's default."""
    if name is None:
        return (recipe.default_model_4bit if backend_name == "unsloth" and recipe.default_model_4bit
                else recipe.default_model)
    if name.startswith("tiny:"):
        from .tiny import tiny_model_path

        return str(tiny_model_path(name.split(":", 1)[1]))
    return name
