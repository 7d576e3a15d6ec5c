"""examples/: a recipe of your own, with a way to make its data, runs the whole job."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unsloth_med.data.sources import load_recipe_data
from unsloth_med.errors import DataError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_recipe.py"


def _example():
    spec = importlib.util.spec_from_file_location("custom_recipe", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_recipe_makes_its_data_and_loads_it(tmp_path):
    example = _example()
    root = example.make_data(tmp_path / "data", train=3, test=2)
    splits = load_recipe_data(example.RECIPE, str(root))
    assert (len(splits["train"]), len(splits["test"])) == (9, 6)
    assert sorted(set(splits["test"]["target"])) == sorted(example.RECIPE.labels)


def test_a_missing_folder_offers_no_download_to_a_recipe_without_one(tmp_path):
    example = _example()
    with pytest.raises(DataError) as error:
        load_recipe_data(example.RECIPE, str(tmp_path / "nowhere"))
    assert "Data folder not found" in str(error.value) and "download" not in str(error.value)
    from unsloth_med.recipes.bone_fracture import RECIPE  # a Kaggle default: the hint stays

    with pytest.raises(DataError, match="download the recipe's default dataset"):
        load_recipe_data(RECIPE, str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_custom_recipe_runs_the_whole_job_from_its_docstring_commands(tmp_path, tiny_path):
    tiny_path("mistral3")
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1])}
    made = subprocess.run([sys.executable, str(EXAMPLE), "--make_data", str(tmp_path / "data")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    done = subprocess.run([sys.executable, str(EXAMPLE), "--data_dir", str(tmp_path / "data"), "--model",
                           "tiny:mistral3", "--max_steps", "2", "--image_size", "64", "--max_eval_samples", "6",
                           "--output_dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["complete"] is True
