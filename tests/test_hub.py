"""Model cards (metadata, metrics, attribution, disclaimer) and Hub pushes (never reaching a real host)."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from unsloth_med import hub
from unsloth_med.cli.push import push_command
from unsloth_med.errors import ConfigError, CredentialsError, ExportError, NetworkError
from unsloth_med.hub import model_card, push
from unsloth_med.recipes import get_recipe

FAKE_TOKEN = "hf_FAKEtokenForTestsOnly0123456789abcd"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({
        "before": {"accuracy": 0.1143, "macro_f1": 0.0412, "per_class": {"x": 1}},
        "after": {"accuracy": 0.8571, "macro_f1": 0.8302}, "test_size": 140, "mode": "score"}))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"model": "unsloth/Ministral-3-14B-Instruct-2512", "backend": "unsloth", "load_in_4bit": True},
        "lora": {"lora_r": 16, "lora_alpha": 16, "finetune_vision_layers": True},
        "data": {"image_size": 512, "data_dir": "/data/bone-break"},
        "training": {"learning_rate": 2.0e-4, "max_steps": 30, "per_device_train_batch_size": 2, "seed": 3407,
                     "report_to": "none", "output_dir": "runs/x"}}))
    return run


def test_model_card_has_metadata_metrics_attribution_and_disclaimer(run_dir):
    recipe = get_recipe("bone_fracture")
    card = model_card(recipe, base_model="unsloth/Ministral-3-14B-Instruct-2512", run_dir=run_dir,
                      repo_id="someone/bone-fracture-ministral3")
    meta = _front_matter(card)
    assert meta["base_model"] == "unsloth/Ministral-3-14B-Instruct-2512"
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert {"medical", "unsloth-med", "bone-fracture"} <= set(meta["tags"])
    # before/after metrics from metrics.json
    assert "| accuracy | 0.1143 | 0.8571 |" in card and "| macro_f1 | 0.0412 | 0.8302 |" in card
    assert "test examples: 140" in card and "evaluation mode: score" in card
    # recipe and training config
    assert recipe.instruction in card and "Spiral Fracture" in card
    assert "learning_rate: 0.0002" in card and "lora_r: 16" in card and "max_steps: 30" in card
    # dataset attribution and the disclaimer
    assert recipe.source.attribution in card
    assert "educational and research use only" in card
    assert "Do not use it for diagnosis, clinical decision-making or patient care" in card
    assert 'from_pretrained("someone/bone-fracture-ministral3"' in card


def test_model_card_for_an_hf_dataset_adapter_and_a_local_base(tmp_path):
    recipe = get_recipe("radiology_caption")
    card = model_card(recipe, base_model="unsloth/Llama-3.2-11B-Vision-Instruct", export_format="adapter",
                      metrics={"before": {"bleu": 1.2, "rougeL": 0.1}, "after": {"bleu": 14.5, "rougeL": 0.31}})
    meta = _front_matter(card)
    assert meta["datasets"] == ["unsloth/Radiology_mini"] and meta["license"] == "llama3.2"
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "| bleu | 1.2000 | 14.5000 |" in card and "PeftModel.from_pretrained" in card

    local = tmp_path / "tiny-base"
    local.mkdir()
    meta = _front_matter(model_card(recipe, base_model=str(local)))
    assert "base_model" not in meta and meta["license"] == "other"  # a local folder is no Hub id
    assert "No evaluation metrics" in model_card(recipe, base_model=str(local))


def test_model_card_reads_the_eval_files_before_metrics_json_exists(tmp_path):
    """The pipeline exports before it writes metrics.json: eval_before/after.json hold {metrics, predictions}."""
    for key, accuracy in (("before", 0.25), ("after", 0.75)):
        (tmp_path / f"eval_{key}.json").write_text(json.dumps({
            "metrics": {"mode": "score", "n": 4, "accuracy": accuracy, "macro_f1": 0.5, "per_class": {}},
            "predictions": [{"id": "a", "prediction": "x"}]}))
    card = model_card(get_recipe("bone_fracture"), base_model="a/b", run_dir=tmp_path)
    assert "| accuracy | 0.2500 | 0.7500 |" in card and "test examples: 4" in card


def test_model_card_never_carries_a_secret(run_dir, monkeypatch):
    """Even if a secret ended up in a config field the card shows, the card holds '***' in its place. (The field
    is one the card prints: a secret in data_dir, which the card never shows, proved nothing.)"""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config.setdefault("training", {})["optim"] = "adamw_plain_marker"
    shown = model_card(get_recipe("bone_fracture"), base_model="x/y", run_dir=run_dir, config=config)
    assert "adamw_plain_marker" in shown  # the card prints this field
    config["training"]["optim"] = f"adamw-{FAKE_TOKEN}"
    card = model_card(get_recipe("bone_fracture"), base_model="x/y", run_dir=run_dir, config=config)
    assert FAKE_TOKEN not in card and "adamw-***" in card


def test_write_model_card_refreshes_readme_from_the_run(run_dir, tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "unsloth_med.json").write_text(json.dumps({"recipe": "bone_fracture", "base_model": "a/b",
                                                         "image_size": 512, "format": "merged-16bit"}))
    hub.write_model_card(folder, run_dir=run_dir, repo_id="me/model")
    assert "0.8571" in (folder / "README.md").read_text()


@pytest.fixture
def export_dir(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "export.json").write_text("{}")
    (folder / "README.md").write_text("---\nlicense: other\n---\n")
    return folder


@pytest.fixture
def no_offline(monkeypatch):
    """Let huggingface_hub try the network (conftest sets HF_HUB_OFFLINE=1); the endpoint is unroutable."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def test_push_without_network_says_the_export_is_saved_and_how_to_push_later(export_dir, monkeypatch, no_offline,
                                                                             caplog):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    started = time.time()
    with pytest.raises(NetworkError) as info:
        push(export_dir, "someone/bone-fracture")
    assert time.time() - started < 20
    message = str(info.value)
    assert f"saved locally in {export_dir}" in message
    assert f"unsloth-med push {export_dir} someone/bone-fracture" in message
    assert FAKE_TOKEN not in message and FAKE_TOKEN not in caplog.text


def test_push_in_offline_mode_and_without_a_token(export_dir, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkError, match="unsloth-med push"):
        push(export_dir, "someone/x")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(CredentialsError, match="HF_TOKEN"):
        push(export_dir, "someone/x")


def test_push_refuses_bad_input_and_folders_holding_a_secret(export_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(ConfigError, match="OWNER/NAME"):
        push(export_dir, "not-a-repo-id")
    with pytest.raises(ExportError, match="not an exported folder"):
        push(tmp_path / "missing", "someone/x")
    (export_dir / "notes.txt").write_text(f"token={FAKE_TOKEN}")
    with pytest.raises(ExportError, match="notes.txt") as info:
        push(export_dir, "someone/x")
    assert FAKE_TOKEN not in str(info.value)


def test_push_creates_a_private_repo_and_uploads_the_folder(export_dir, monkeypatch, capsys):
    """Through huggingface_hub's own client, answered by a fake Hub (tests/test_privacy.py)."""
    from test_privacy import ENDPOINT, serve_fake_hub

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    fake = serve_fake_hub(monkeypatch)
    assert push(export_dir, "someone/x") == f"{ENDPOINT}/someone/x"
    assert fake.repos["someone/x"]["private"] is True
    assert fake.files("someone/x") == {p.name: p.read_bytes() for p in export_dir.iterdir()}
    assert push_command([str(export_dir), "someone/y", "--public"]) == 0
    assert fake.repos["someone/y"]["private"] is False
    assert "Pushed" in capsys.readouterr().out


def test_model_card_tells_how_images_were_sized():
    from unsloth_med.hub import model_card
    from unsloth_med.recipes.bone_fracture import RECIPE

    bucketed = model_card(RECIPE, base_model="unsloth/x", metrics={},
                          config={"data": {"image_size": 512, "image_buckets": True}})
    plain = model_card(RECIPE, base_model="unsloth/x", metrics={},
                       config={"data": {"image_size": 512, "image_buckets": False}})
    assert "padded with black into the nearest fixed shape" in bucketed and "512 px" in bucketed
    assert "at most 512 px" in plain and "padded" not in plain


# ----------------------------------------------------------------------------- the card from what the run recorded
def _export_folder(tmp_path, recipe, **extra):
    from unsloth_med.recipes import recipe_record

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "unsloth_med.json").write_text(json.dumps({**recipe_record(recipe), "base_model": "a/b",
                                                         "image_size": 64, "format": "adapter", **extra}))
    return folder


@pytest.mark.parametrize("kind", ["classify", "caption"])
def test_card_of_a_generic_recipe_run_names_its_instruction_labels_and_data(kind, run_dir, tmp_path):
    from unsloth_med.recipes.resolve import build_generic_recipe

    recipe = build_generic_recipe(kind, data_source="/data/own/labels.csv",
                                  labels=["normal", "pneumonia"] if kind == "classify" else None,
                                  attribution="Chest X-rays of the Example Hospital, CC BY 4.0.")
    folder = _export_folder(tmp_path, recipe)
    card = hub.write_model_card(folder, run_dir=run_dir, repo_id="me/model").read_text()
    assert "{labels}" not in card
    assert f'Instruction given with each image: "{recipe.instruction}"' in card
    assert f"instruction = {json.dumps(recipe.instruction)}" in card  # the usage snippet
    assert "Chest X-rays of the Example Hospital, CC BY 4.0." in card
    if kind == "classify":
        assert "Classes (2): normal, pneumonia" in card and "normal, pneumonia" in recipe.instruction


def test_card_of_a_custom_recipe_module_needs_no_import_of_it(run_dir, tmp_path, monkeypatch):
    """The push machine need not have the user's recipe module: the card comes from the run's record."""
    import sys

    (tmp_path / "my_fracture_recipe.py").write_text(
        "from unsloth_med.recipes.base import DataSource, Recipe\n"
        "RECIPE = Recipe(name='fracture_yes_no', task='classification', labels=('fractured', 'not fractured'),\n"
        "                instruction='Is there a fracture? Reply fractured or not fractured.',\n"
        "                source=DataSource(kind='class_folders', attribution='Our own wrist X-rays, internal use.'),\n"
        "                default_model='unsloth/Ministral-3-3B-Instruct-2512')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = get_recipe("my_fracture_recipe")
    folder = _export_folder(tmp_path, recipe)
    monkeypatch.delitem(sys.modules, "my_fracture_recipe")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    card = hub.write_model_card(folder, run_dir=run_dir).read_text()
    assert "- Recipe: `fracture_yes_no` (classification)" in card
    assert "Classes (2): fractured, not fractured" in card and "Is there a fracture?" in card
    assert "Our own wrist X-rays, internal use." in card


def test_card_of_an_old_export_whose_recipe_cannot_be_rebuilt_says_why(run_dir, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "unsloth_med.json").write_text(json.dumps({"recipe": "no_such_recipe_module", "base_model": "a/b"}))
    with pytest.raises(ExportError, match="Unknown recipe 'no_such_recipe_module'.*Export the run again"):
        hub.write_model_card(folder, run_dir=run_dir)


def test_a_recipe_modules_own_import_error_is_reported_with_its_cause(tmp_path, monkeypatch):
    (tmp_path / "recipe_needing_a_package.py").write_text("import package_that_is_not_installed_xyz\nRECIPE = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        get_recipe("recipe_needing_a_package")
    message = str(info.value)
    assert "failed to import" in message and "package_that_is_not_installed_xyz" in message
    assert "Unknown recipe" not in message
    with pytest.raises(ConfigError, match="Unknown recipe 'recipe_that_does_not_exist_xyz'"):
        get_recipe("recipe_that_does_not_exist_xyz")


def test_model_card_gives_each_score_its_95_percent_interval(tmp_path):
    from unsloth_med.evaluate import classification_metrics

    labels = list(get_recipe("bone_fracture").labels)
    targets = [labels[i % len(labels)] for i in range(140)]
    for key, right in (("before", 14), ("after", 120)):  # the first `right` answers are right
        answers = [t if i < right else labels[(labels.index(t) + 1) % len(labels)] for i, t in enumerate(targets)]
        (tmp_path / f"eval_{key}.json").write_text(json.dumps(
            {"metrics": classification_metrics(targets, answers, labels), "predictions": []}))
    after = json.loads((tmp_path / "eval_after.json").read_text())["metrics"]
    card = model_card(get_recipe("bone_fracture"), base_model="a/b", run_dir=tmp_path)
    low, high = after["accuracy_ci95"]
    assert f"| 0.8571 [{low:.3f}, {high:.3f}] |" in card and "95% intervals (Wilson for accuracy" in card
    assert "accuracy_ci95" not in card  # the interval rides with its score, not as a row of its own


def test_only_a_published_dataset_is_called_public_on_the_card(tmp_path):
    """A card of the user's own data (or of the demo's generated images) said "Trained and evaluated on one public
    dataset"."""
    import dataclasses

    from unsloth_med.recipes.base import DataSource

    recipe = get_recipe("bone_fracture")
    assert "on one public dataset" in model_card(recipe, base_model="a/b", metrics={})
    own = dataclasses.replace(recipe, source=DataSource(kind="auto", id=str(tmp_path / "scans"),
                                                        attribution="Our own wrist X-rays, internal use."))
    demo = dataclasses.replace(recipe, source=dataclasses.replace(recipe.source, id="", attribution="Generated."))
    for other in (own, demo):
        card = model_card(other, base_model="a/b", metrics={})
        assert "public" not in card and "Trained and evaluated on one dataset;" in card
