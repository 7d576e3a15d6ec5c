"""The package's layering, checked on the source (AST), imports inside functions included:

- data/ and models/ import nothing from the layers above them (recipes, pipeline, cli, export, hub,
  evaluate, train, predict, bench, backends);
- a recipe imports no trainer, backend or CLI (nor torch/transformers/trl/peft/unsloth): it is data plus small
  pure functions.

Two kinds of block are not counted, and why:
- `if __name__ == "__main__":` runs only when the file is the program (`python -m unsloth_med.recipes.X`),
  never on import, so it adds no edge to the import graph; it must stay a one-line call (the CLI import plus
  one statement), which this test also checks.
- `if TYPE_CHECKING:` never runs: annotations only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unsloth_med"

UPPER = ("recipes", "pipeline", "cli", "export", "hub", "evaluate", "train", "predict", "bench",
         "backends")
RULES = {  # layer -> modules (under unsloth_med, or top-level packages) it must not import
    "data": UPPER,
    "models": UPPER,
    "recipes": ("pipeline", "cli", "train", "backends", "bench", "export", "hub", "predict",
                "torch", "transformers", "trl", "peft", "unsloth"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _skipped_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = ast.unparse(node.test)
    return test in ("__name__ == '__main__'", "TYPE_CHECKING", "typing.TYPE_CHECKING")


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth, outside the two skipped blocks."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _skipped_block(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((child.lineno, target))
                if not child.module:  # `from . import x`: x may be a module
                    found.extend((child.lineno, f"{target}.{alias.name}") for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text() if source is None else source, str(path)))
    return found


def _layer_files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


THIRD_PARTY = {"torch", "transformers", "trl", "peft", "unsloth"}


def _forbidden(target: str, banned: tuple[str, ...]) -> bool:
    """Whether `target` is one of the banned modules or inside one (package modules are under unsloth_med)."""
    prefixes = [name if name in THIRD_PARTY else f"unsloth_med.{name}" for name in banned]
    return any(target == prefix or target.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("layer", sorted(RULES))
def test_lower_layers_import_nothing_from_above(layer):
    files = _layer_files(layer)
    assert files, f"no modules under unsloth_med/{layer}"
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
           for path in files for line, target in imports(path) if _forbidden(target, RULES[layer])]
    assert bad == [], "layering broken:\n  " + "\n  ".join(bad)


def test_the_checker_sees_imports_inside_functions_and_skips_main_blocks():
    source = ("def f():\n    from ..recipes import get_recipe\n"
              "if __name__ == '__main__':\n    from ..cli import main\n    main()\n")
    assert imports(PACKAGE / "data" / "probe.py", source) == [(2, "unsloth_med.recipes")]
    assert _forbidden("unsloth_med.recipes", RULES["data"]) and not _forbidden("unsloth_med.errors", RULES["data"])
    assert _forbidden("torch.nn", RULES["recipes"]) and not _forbidden("unsloth_med.data.tables", RULES["recipes"])


@pytest.mark.parametrize("path", sorted((PACKAGE / "recipes").glob("*.py")), ids=lambda p: p.name)
def test_a_recipe_main_block_is_a_one_line_call(path):
    """`python -m unsloth_med.recipes.X` works through a one-line `__main__` that imports the CLI only then."""
    tree = ast.parse(path.read_text())
    blocks = [node for node in tree.body if isinstance(node, ast.If) and _skipped_block(node)
              and "__main__" in ast.unparse(node.test)]
    for block in blocks:
        calls = [stmt for stmt in block.body if not isinstance(stmt, (ast.Import, ast.ImportFrom))]
        assert len(calls) == 1 and isinstance(calls[0], ast.Expr), ast.unparse(block)


def test_the_demo_data_tiny_tokenizer_and_recipe_share_one_copy_of_the_dataset_facts():
    """The bone-break classes, layout and prompt live once, in data/bone_break.py: the recipe, the demo's generator
    and the tiny tokenizer all use that copy (data/ and models/ never import a recipe)."""
    from unsloth_med.data import bone_break, synthetic
    from unsloth_med.models import tiny
    from unsloth_med.recipes.bone_fracture import RECIPE

    assert RECIPE.labels is bone_break.CLASSES and RECIPE.instruction is bone_break.INSTRUCTION
    assert RECIPE.source.layout is bone_break.LAYOUT and synthetic.LAYOUT is bone_break.LAYOUT
    assert synthetic.CLASSES is bone_break.CLASSES and tiny.DEMO_INSTRUCTION is bone_break.INSTRUCTION
    for module in ("recipes/bone_fracture.py", "data/synthetic.py", "models/tiny.py"):
        source = (PACKAGE / module).read_text()
        assert '"Avulsion fracture",\n    "Comminuted fracture"' not in source, module  # no second class tuple


# Parsers that stay outside unsloth_med/cli/, and why: config.py is the config loader (defaults < recipe < presets
# < YAML < flags) that library code and tests call; the bench's `--worker` and the GGUF converter's `main` are
# the argument protocols of subprocesses the package starts itself, never typed by a user.
PARSERS_OUTSIDE_THE_CLI = {"unsloth_med.config", "unsloth_med.bench", "unsloth_med.gguf.convert"}


def test_command_line_parsers_live_in_the_cli_package():
    """One command per module under cli/ (TRL keeps one per file); library modules build no argument parser."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in (
                    "ArgumentParser", "HfArgumentParser", "TrlParser"):
                found.add(_module_name(path))
    assert found == PARSERS_OUTSIDE_THE_CLI


def test_every_command_is_a_function_in_its_own_cli_module():
    import importlib

    from unsloth_med.cli import COMMANDS

    modules = [target.split(":")[0] for target, _ in COMMANDS.values()]
    assert all(module.startswith("unsloth_med.cli.") for module in modules) and len(set(modules)) == len(modules)
    for target, _ in COMMANDS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
