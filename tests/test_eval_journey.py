"""What a user meets after training: `unsloth-med evaluate RUN` and `unsloth-med predict` on a run folder give the
numbers and answers the run gave (its evaluation mode and generation budget), say when generation cut an answer
short, and take a folder of images. A hand-made run folder around the tiny random-weight Ministral-3 model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from unsloth_med.backends.hf import HFBackend
from unsloth_med.config import ModelArgs
from unsloth_med.evaluate.report import format_table, write_report
from unsloth_med.predict import evaluate_saved_model, format_predictions, predict
from unsloth_med.recipes.bone_fracture import RECIPE
from unsloth_med.recipes.radiology_caption import RECIPE as CAPTION_RECIPE

IMAGE_SIZE = 32
BUDGET = 3  # the run's --max_new_tokens: the recipe defaults are 12 (bone_fracture) and 128 (radiology_caption)


def _png(path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_path):
    """A run folder as the pipeline leaves it after a full fine-tune (whole weights in adapter/), trained on class
    folders of the bone_fracture classes (one image each), that evaluated with --eval_mode generate
    --max_new_tokens 3."""
    root = tmp_path_factory.mktemp("journey")
    base = str(tiny_path("mistral3"))
    model, processor = HFBackend().load(base, ModelArgs())
    run = root / "run"
    model.save_pretrained(run / "adapter")
    processor.save_pretrained(run / "adapter")
    (run / "adapter" / "unsloth_med.json").write_text(json.dumps({"recipe": "bone_fracture", "base_model": base,
                                                                  "image_size": IMAGE_SIZE}))
    data = root / "data"
    for k, label in enumerate(RECIPE.labels):
        for split in ("Train", "Test"):
            _png(data / label / split / f"{split.lower()}{k}.png", seed=10 * k + len(split))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "run": {"recipe": "bone_fracture"}, "model": {"model": base},
        "data": {"image_size": IMAGE_SIZE, "data_dir": str(data)},
        "eval": {"eval_mode": "generate", "max_new_tokens": BUDGET}}))
    return run


def test_evaluate_on_a_run_folder_uses_the_runs_mode_and_generation_budget(run_folder):
    """Before: label scoring and the recipe's 12 new tokens, whatever the run evaluated with, so `unsloth-med
    evaluate RUN` did not reproduce the run's eval_after.json (a caption run at --max_new_tokens 6: ROUGE-L 0.0174
    against 0.0000)."""
    result = evaluate_saved_model(str(run_folder), progress=False)
    metrics = result["metrics"]
    assert metrics["mode"] == "generate" and metrics["max_new_tokens"] == BUDGET and metrics["n"] == 10
    assert all("answer" in p for p in result["predictions"])
    # Flags still win over what the run recorded.
    scored = evaluate_saved_model(str(run_folder), mode="score", progress=False)
    assert scored["metrics"]["mode"] == "score" and "probabilities" in scored["predictions"][0]
    longer = evaluate_saved_model(str(run_folder), max_new_tokens=BUDGET + 2, progress=False)
    assert longer["metrics"]["max_new_tokens"] == BUDGET + 2


def test_answers_cut_off_at_max_new_tokens_are_flagged_counted_and_reported(run_folder, tmp_path):
    """The untrained tiny model never ends its answer within 3 tokens: every answer is cut off. Before, nothing in
    eval_*.json, the console table or the report said so."""
    result = evaluate_saved_model(str(run_folder), progress=False)
    metrics, predictions = result["metrics"], result["predictions"]
    assert [p["cut_off"] for p in predictions] == [True] * 10
    assert metrics["cut_off"] == 10
    assert "Answers cut off at max_new_tokens" in format_table(None, result)
    write_report(tmp_path, RECIPE, None, result)
    report = (tmp_path / "report.md").read_text()
    assert f"10 of 10 answers were cut off at max_new_tokens ({BUDGET})" in report
    assert json.loads((tmp_path / "metrics.json").read_text())["after"]["cut_off"] == 10
    # With room to end them (the stop token is generated), nothing is cut off and no row is added.
    unlimited = {"metrics": {**metrics, "cut_off": 0}}
    assert "cut off" not in format_table(None, unlimited)


def test_cut_off_rows_are_those_without_a_stop_token():
    from unsloth_med.evaluate.caption import cut_off_rows

    pad, stop = 0, 2
    new = torch.tensor([[5, 6, stop, pad], [5, 6, 8, 9], [stop, pad, pad, pad], [5, 6, 7, stop]])
    assert cut_off_rows(new, [stop]) == [False, True, False, False]
    assert cut_off_rows(new[:, :0], [stop]) == [False] * 4


def test_predict_on_a_run_folder_generates_with_the_runs_budget_and_says_when_it_cut(run_folder, tmp_path):
    images = [_png(tmp_path / "a.png", 1)]
    captions = predict(run_folder, images, recipe="radiology_caption")  # a generating recipe on the same weights
    assert CAPTION_RECIPE.max_new_tokens > BUDGET
    assert captions[0]["cut_off_at"] == BUDGET  # before: 128 new tokens, the recipe's, and nothing said
    assert f"cut off at {BUDGET} new tokens" in format_predictions(captions)
    assert predict(run_folder, images, recipe="radiology_caption", max_new_tokens=BUDGET + 1)[0]["cut_off_at"] == 4


def test_predict_takes_a_folder_of_images(run_folder, tmp_path):
    """Before: a folder was read as one image and reported as 'file not found', though it was there."""
    folder = tmp_path / "xrays"
    images = [_png(folder / "b.png", 2), _png(folder / "a.png", 3)]
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    results = predict(run_folder, [str(folder), str(tmp_path / "empty")])
    assert [r["image"] for r in results] == [*sorted(images), str(tmp_path / "empty")]
    assert all(r["label"] in RECIPE.labels for r in results[:2])
    assert "folder with no image files" in results[2]["error"]



def test_predict_asks_for_every_other_column_the_instruction_names(run_folder, tmp_path, capsys):
    """A model trained with --instruction "Modality: {modality}. ..." (a column of its listing): predict used to fill
    {modality} with "" without a word, asking the model what it was never trained on. Now it names the placeholder
    and takes its value (--field modality=CT), which reaches the prompt."""
    import shutil

    from unsloth_med.cli.predict import predict_command
    from unsloth_med.errors import ConfigError
    from unsloth_med.evaluate.classify import score_rows
    from unsloth_med.predict import load_for_inference

    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["instruction"] = "Modality: {modality}. Which fracture is this? One of: {labels}."
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    image = _png(tmp_path / "a.png", 4)
    loaded = load_for_inference(run)
    with pytest.raises(ConfigError, match=r"names \{modality\}.*--field modality=VALUE"):
        predict(loaded, [image])
    result = predict(loaded, [image], fields={"modality": "X-ray"})[0]

    def scored(modality):
        probs = score_rows(loaded.model, loaded.processor, loaded.recipe, [{"image": image, "modality": modality}],
                           loaded.recipe.labels, image_size=loaded.image_size).softmax(dim=-1)[0]
        return {label: float(p) for label, p in zip(loaded.recipe.labels, probs)}

    assert result["probabilities"] == pytest.approx(scored("X-ray"))
    assert result["probabilities"] != pytest.approx(scored(""))  # the value changed the prompt
    # the command line: --field NAME=VALUE; without it, one error line naming the flag
    assert predict_command(["--model", str(run), "--field", "modality=X-ray", image]) == 0
    assert result["label"] in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--field modality=VALUE"):
        predict_command(["--model", str(run), image])
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        predict_command(["--model", str(run), "--field", "modality", image])


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_generation_budget_below_one_is_one_error_line_before_the_model_loads(run_folder, command, capsys):
    """Before: `--max_new_tokens 0` (or -2) loaded the model, then stopped with transformers' ValueError traceback."""
    from unsloth_med.cli import main

    image = str(next((run_folder.parent / "data").rglob("*.png")))
    for budget in ("0", "-2"):
        with pytest.raises(SystemExit) as stopped:
            main([command, "--model", str(run_folder), "--max_new_tokens", budget,
                  *([image, "--recipe", "radiology_caption"] if command == "predict" else [])])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert f"--max-new-tokens: a whole number of tokens above 0, not '{budget}'" in err
        assert "Traceback" not in err and "Loading weights" not in err  # refused before the model loads
