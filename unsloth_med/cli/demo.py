"""`unsloth-med demo`: the offline demo (bone_fracture --demo: a tiny model on generated X-rays)."""
from __future__ import annotations

from .train import train_command


def demo_command(argv: list[str]) -> int:
    from ..recipes import get_recipe

    return train_command(["--demo", *argv], get_recipe("bone_fracture"), prog="unsloth-med demo")
