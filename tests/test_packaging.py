"""A regular (wheel) install works like the checkout: every module and every recipe preset ships, and the
README's first command runs from the installed package alone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("unsloth_med", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("unsloth_med-*.whl")
    return path


def test_the_wheel_holds_every_module_and_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "unsloth_med").rglob("*.py")}
    presets = {"unsloth_med/presets/" + p.relative_to(REPO / "recipes").as_posix()
               for p in (REPO / "recipes").glob("*/*.yaml")}
    assert presets and "unsloth_med/presets/bone_fracture/demo.yaml" in presets
    assert modules - names == set() and presets - names == set()


@pytest.mark.slow
def test_the_demo_runs_from_the_installed_wheel(wheel, tmp_path):
    """Installed into a fresh folder, away from the checkout: presets come from the package."""
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy only: not the checkout
    code = "import unsloth_med.config as c; print(c.__file__); print(c.presets_dir())"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    module_file, presets = where.stdout.split()
    assert Path(module_file).is_relative_to(target) and Path(presets) == target / "unsloth_med" / "presets"
    # The README's `--config recipes/<recipe>/<name>.yaml`, outside a checkout: the shipped copy is read.
    code = ("from unsloth_med.config import parse_config; c = parse_config(['--recipe', 'bone_fracture', '--config', "
            "'recipes/bone_fracture/ministral3-14b.yaml']); print(c.model.model)")
    read = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert read.stdout.split()[-1:] == ["unsloth/Ministral-3-14B-Instruct-2512-unsloth-bnb-4bit"], read.stderr[-2000:]
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "unsloth_med.recipes.bone_fracture", "--demo", "--max_steps", "2",
                           "--max_eval_samples", "10", "--output_dir", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert json.loads((out / "run.json").read_text())["complete"] is True
