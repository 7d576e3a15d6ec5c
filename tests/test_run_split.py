"""`unsloth-med evaluate` and `check-data` see the test split the run made: its seed, --split_by and --test_fraction
(a split made with other settings holds the run's training images), and evaluate scores the very examples the run
scored. A real run of a tiny model on a listing without a split column."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from unsloth_med.cli import generic_main, main
from unsloth_med.predict import evaluate_saved_model


def _listing(folder, n: int = 30):
    rng = np.random.default_rng(1)
    rows = ["file,label"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"x{i}.png")
        rows.append(f"x{i}.png,{('cat', 'dog', 'fox')[i % 3]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_evaluate_and_check_data_use_the_runs_split(tmp_path, tiny_path, capsys):
    tiny_path("mistral3")
    listing, out = _listing(tmp_path), tmp_path / "run"
    split = ["--seed", "42", "--test_fraction", "0.3", "--split_by", "image"]
    options = ["--data_dir", str(listing), "--image_column", "file", "--target_column", "label", *split]
    assert generic_main(["classify", *options, "--model", "tiny:mistral3", "--max_steps", "1", "--image_size", "32",
                         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                         "--eval_before", "false", "--save_strategy", "no", "--output_dir", str(out)]) == 0
    ran = sorted(p["id"] for p in json.loads((out / "eval_after.json").read_text())["predictions"])
    assert len(ran) == 9

    result = evaluate_saved_model(str(out), progress=False)
    assert sorted(p["id"] for p in result["predictions"]) == ran  # seed 3407 and a row split gave other ids
    fewer = evaluate_saved_model(str(out), max_eval_samples=4, progress=False)
    assert len(fewer["predictions"]) == 4 and {p["id"] for p in fewer["predictions"]} <= set(ran)

    capsys.readouterr()
    summary_path = tmp_path / "check.json"
    with pytest.raises(SystemExit) as exit:
        main(["check-data", "--recipe", "classify", *options, "--json", str(summary_path)])
    assert exit.value.code == 0
    checked = json.loads(summary_path.read_text())
    recorded = json.loads((out / "data_summary.json").read_text())
    assert checked["sizes"] == recorded["sizes"] == {"train": 21, "test": 9}
    assert checked["class_counts"] == recorded["class_counts"]


def test_a_test_fraction_outside_0_to_1_is_refused_when_the_options_are_parsed(tmp_path):
    """--test_fraction 0 or 1 (or beyond) holds out nothing or everything: refused in one line before any data is
    read. Before, --split_by image took 1.0 as "all images but one", and the tables' hold-out failed later."""
    from unsloth_med.config import parse_config
    from unsloth_med.errors import ConfigError
    from unsloth_med.recipes import get_recipe

    recipe = get_recipe("radiology_vqa")
    argv = ["--output_dir", str(tmp_path), "--split_by", "image"]
    assert parse_config([*argv, "--test_fraction", "0.2"], recipe).data.test_fraction == 0.2
    for fraction in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=r"--test_fraction .*: the share of the data held out for testing"):
            parse_config([*argv, "--test_fraction", fraction], recipe)
