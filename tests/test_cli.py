"""The command line a newcomer meets: a short grouped --help, --help-all, and typos that fail at once."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from unsloth_med.cli import main
from unsloth_med.errors import ConfigError
from unsloth_med.options import TRAINER_OPTIONS, check_known_options, option_names, short_help

PROBE = """
import sys
from unsloth_med.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    heavy = [name for name in ("torch", "transformers", "trl", "datasets") if name in sys.modules]
    print("exit", exit.code, "heavy", ",".join(heavy) or "none")
"""


def _run(*argv: str, code: str = PROBE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_a_typo_fails_at_once_naming_the_option_it_meant():
    started = time.perf_counter()
    done = _run("train", "--recipe", "bone_fracture", "--demo", "--max_stesp", "30")
    seconds = time.perf_counter() - started
    assert done.stderr.strip() == "error: unknown option --max_stesp (did you mean --max_steps?)"
    assert done.stdout.split() == ["exit", "2", "heavy", "none"]  # before torch, transformers, TRL
    assert seconds < 10, seconds  # measured 0.4 s on 2 busy cores; the bound only guards against a hang
    recipe = subprocess.run([sys.executable, "-m", "unsloth_med.recipes.bone_fracture", "--max-stesp", "3"],
                            capture_output=True, text=True, timeout=120)
    assert recipe.returncode == 2
    assert recipe.stderr.strip() == "error: unknown option --max-stesp (did you mean --max-steps?)"


def test_known_options_pass_the_early_check():
    check_known_options(["--max-steps", "3", "--lora_r=8", "--no_eval_before", "--labels", "a", "-1", "--demo"])
    with pytest.raises(ConfigError, match=r"unknown option --lora_alpah \(did you mean --lora_alpha\?\)"):
        check_known_options(["--lora_alpah", "8"])
    with pytest.raises(ConfigError, match=r"unknown option --zzz \(--help lists"):
        check_known_options(["--zzz"])


def test_the_trainer_option_list_is_trls():
    """options.TRAINER_OPTIONS (used before TRL is imported) must be exactly SFTConfig's fields."""
    from unsloth_med.config import trl_sft_config

    assert TRAINER_OPTIONS == {f.name for f in dataclasses.fields(trl_sft_config())}


def test_short_help_is_grouped_and_short():
    done = _run("train", "--help")
    text = done.stdout.rsplit("exit", 1)[0]
    lines = text.strip().splitlines()
    assert lines[0].startswith("usage: unsloth-med train --recipe NAME")
    headers = [line.split(" (")[0].rstrip(":") for line in lines
               if line.endswith(":") and " " not in line or line.startswith("training (")]
    assert headers == ["run", "model", "lora", "data", "training", "eval", "export"]
    assert len(lines) < 100 and max(map(len, lines)) <= 120
    assert "--optim NAME" in text and "adamw_hf" not in text  # no 40 inline choices
    assert done.stdout.split()[-3:] == ["0", "heavy", "none"]
    flags = {line.split()[0].lstrip("-") for line in lines if line.startswith("  --")}
    assert flags - {"help-all"} <= option_names()  # every option shown is a real one


def test_a_recipe_module_help_names_the_module():
    text = short_help("python -m unsloth_med.recipes.bone_fracture", recipe_given=True)
    assert text.startswith("usage: python -m unsloth_med.recipes.bone_fracture [--config FILE]")
    assert "--recipe" not in text


def test_help_all_lists_every_trainer_option(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--help-all"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: unsloth-med train")
    assert all(f"--{name}" in text for name in ("max_steps", "optim", "lora_r", "ddp_timeout", "neftune_noise_alpha"))


def test_a_bad_value_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--recipe", "bone_fracture", "--max_steps", "many"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --max_steps") and "invalid int value: 'many'" in err
    assert "\n" not in err and "usage:" not in err


def test_unknown_command_and_other_commands_use_the_same_error_style(capsys):
    with pytest.raises(SystemExit):
        main(["trian"])
    assert capsys.readouterr().err.startswith("error: unknown command 'trian'")
    with pytest.raises(SystemExit) as exit:
        main(["predict", "image.png"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: the following arguments are required: --model "
                                               "(see unsloth-med predict --help)")


# ----------------------------------------------------------------------------- check-data
def _listing(folder):
    """A CSV listing with its own column names; one test image is a copy of a training image."""
    rng = np.random.default_rng(0)
    rows = ["file,diagnosis,split"]
    for i in range(16):
        split, label = ("train" if i < 12 else "test"), ("normal", "broken")[i % 2]
        name = f"{split[:2]}{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
        rows.append(f"{name},{label},{split}")
    Image.open(folder / "tr4.png").save(folder / "te_copy.png")
    rows.append("te_copy.png,normal,test")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_check_data_takes_train_data_options_and_lists_leaked_pairs(tmp_path, capsys):
    import json

    listing = _listing(tmp_path)
    with pytest.raises(SystemExit) as exit:  # a --json that cannot be written fails before the checks, in one line
        main(["check-data", "--recipe", "classify", "--data_dir", str(listing), "--json", str(tmp_path)])
    assert exit.value.code == 2 and capsys.readouterr().err.startswith(f"error: cannot write --json {tmp_path}")
    out = tmp_path / "new" / "summary.json"  # its folder is made
    with pytest.raises(SystemExit) as exit:
        main(["check-data", "--recipe", "classify", "--data_dir", str(listing), "--image_column", "file",
              "--target_column", "diagnosis", "--labels", "normal,broken", "--json", str(out)])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "train: 12 images, test: 5 images" in text
    assert "leaked test images: 1" in text and "te_copy.png" in text and "tr4.png" in text
    assert "--drop_leaked_test_images" in text and not text.lstrip().startswith("{")  # readable, not a JSON dump
    summary = json.loads(out.read_text())
    assert summary["class_counts"]["train"] == {"broken": 6, "normal": 6}
    assert [leak["test_id"] for leak in summary["leaked_test_images"]] and summary["leaked_count"] == 1


def test_check_data_on_questions_counts_examples_and_images_and_says_how_to_resplit(tmp_path, capsys):
    """VQA-RAD's own split asks test questions about training images. check-data said "train: 10 images" of ten
    questions, and flagged every pair "[labels differ]" (two questions have two answers by design)."""
    rng = np.random.default_rng(1)
    rows = ["image,question,answer,split"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        for q, question in enumerate(("Is there a fracture?", "Which bone?", "Which side?")):
            split = "test" if i < 2 and q > 0 else "train"
            rows.append(f"img{i}.png,{question},answer {i}{q},{split}")
    (tmp_path / "vqa.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as exit:
        main(["check-data", "--recipe", "vqa", "--data_dir", str(tmp_path / "vqa.csv")])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "train: 8 examples, test: 4 examples" in text
    assert "leaked test images: 4" in text and "labels differ" not in text
    assert "2 of 2 test images (carrying 4 of 4 test rows)" in text and "--split_by image" in text


def test_check_data_help_and_errors(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["check-data", "--help"])
    assert exit.value.code == 0 and "--target_column" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main(["check-data", "--recipe", "classify", "--taget_column", "x"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == "error: unknown option --taget_column (did you mean --target_column?)"


def test_the_parser_takes_trls_own_config_after_unsloth_put_its_subclass_in_its_place(monkeypatch, tmp_path):
    """`import unsloth` (2026.10, unsloth/models/rl.py) puts a subclass of SFTConfig with its own `max_seq_length`
    field in TRL's place, renames it to TRL's module and name (so configs pickle), and puts a shim of the same name
    above it. Rebuilt here as Unsloth builds it (it cannot be imported without a GPU): the parser must still take
    TRL's own class, or `--max_seq_length` would belong to two sections (the clash that kept the CLI from importing
    unsloth first)."""
    import trl
    import trl.trainer.sft_trainer as sft_trainer

    from unsloth_med.config import UNSLOTH_PATCHED_CONFIG, parse_config, trl_sft_config
    from unsloth_med.recipes import get_recipe

    pristine = trl_sft_config()

    @dataclasses.dataclass
    class UnslothSFTConfig(pristine):
        max_seq_length: int | None = None

    UnslothSFTConfig.__module__, UnslothSFTConfig.__name__ = pristine.__module__, "SFTConfig"
    setattr(UnslothSFTConfig, UNSLOTH_PATCHED_CONFIG, True)
    shim = type("SFTConfig", (UnslothSFTConfig,), {UNSLOTH_PATCHED_CONFIG: True, "__module__": sft_trainer.__name__})
    monkeypatch.setattr(trl, "SFTConfig", shim)
    monkeypatch.setattr(sft_trainer, "SFTConfig", shim)
    assert trl.SFTConfig is shim and "max_seq_length" in {f.name for f in dataclasses.fields(shim)}

    assert trl_sft_config() is pristine
    config = parse_config(["--output_dir", str(tmp_path), "--max_seq_length", "1024"], get_recipe("bone_fracture"))
    assert config.model.max_seq_length == 1024 and type(config.training) is pristine


def test_seconds_since_process_start_counts_what_ran_before():
    code = ("import time; time.sleep(1.2); from unsloth_med.cli.base import seconds_since_process_start as s; "
            "print(s())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 1.2 <= float(done.stdout) < 60, done


@pytest.mark.skipif(__import__("importlib").util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_an_experiment_logger_that_is_not_installed_is_refused_before_any_work():
    """--report_to mlflow without mlflow: it failed when the trainer was built, after the data checks, the model
    load and the evaluation before training."""
    from unsloth_med.config import parse_config

    with pytest.raises(ConfigError, match=r"--report_to mlflow: not installed here.*\[logging\]"):
        parse_config(["--recipe", "bone_fracture", "--report_to", "mlflow"])
    assert parse_config(["--recipe", "bone_fracture", "--report_to", "tensorboard"]).training.report_to == \
        ["tensorboard"]


def test_a_hub_repo_id_the_hub_refuses_is_refused_before_any_work():
    """--push_to_hub_id me/bad..name passed the parse and failed in huggingface_hub after training and the export."""
    from unsloth_med.config import parse_config

    with pytest.raises(ConfigError, match=r"'me/bad\.\.name' is not a valid Hub repo id"):
        parse_config(["--recipe", "bone_fracture", "--push_to_hub_id", "me/bad..name"])
    assert parse_config(["--recipe", "bone_fracture", "--push_to_hub_id", "me/ok-name"]).export.push_to_hub_id == \
        "me/ok-name"


def test_a_generation_budget_below_one_is_refused_at_parse_time():
    """train --max_new_tokens 0 was accepted and failed in transformers' generate, after training."""
    from unsloth_med.config import parse_config

    with pytest.raises(ConfigError, match=r"--max_new_tokens 0: a whole number of tokens above 0"):
        parse_config(["--recipe", "bone_fracture", "--max_new_tokens", "0"])
    with pytest.raises(ConfigError, match=r"--max_memory_gib 0: a budget in GiB above 0"):  # 0 meant "unset"
        parse_config(["--recipe", "bone_fracture", "--max_memory_gib", "0"])
    assert parse_config(["--recipe", "bone_fracture", "--max_new_tokens", "4"]).eval.max_new_tokens == 4


def test_quick_works_for_a_users_own_recipe_and_demo_still_needs_its_preset():
    """examples/custom_recipe.py --quick said "Recipe 'three_patterns' has no --quick preset": every shipped quick
    preset is the same 30 steps, so a recipe of one's own gets that one."""
    from unsloth_med.config import parse_config
    from unsloth_med.recipes import DataSource, Recipe

    mine = Recipe(name="three_patterns", task="classification", instruction="Which?", labels=("a", "b"),
                  source=DataSource(kind="class_folders"), default_model="tiny:mistral3")
    config = parse_config(["--quick"], mine)
    assert config.training.max_steps == 30 and config.model.train_compiled is False
    with pytest.raises(ConfigError, match="has no --demo preset"):
        parse_config(["--demo"], mine)
