"""Generic recipes (`classify`, `caption`) and the data they read: listings, class folders, HF datasets."""
from __future__ import annotations

import json
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from unsloth_med.cli import generic_main as main
from unsloth_med.data.sources import load_recipe_data
from unsloth_med.data.tables import load_folders, load_table
from unsloth_med.data.tables.holdout import stratified_split
from unsloth_med.data.tables.locations import OFFLINE_ENV, url_cache_path
from unsloth_med.errors import ConfigError, DataError, NetworkError
from unsloth_med.recipes.base import TableSource
from unsloth_med.recipes.generic import CLASSIFY_INSTRUCTION
from unsloth_med.recipes.resolve import (
    build_generic_recipe,
    parse_labels,
    placeholder,
    record_resolved,
    resolve_recipe,
)

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}


def _png(path: Path, colour=(128, 128, 128)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path)
    return path


def _csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.fixture()
def listing(tmp_path):
    """data/labels.csv with images under data/img/<class>/, 10 per class, paths relative to the csv."""
    root = tmp_path / "data"
    lines = []
    for label, colour in COLOURS.items():
        for i in range(10):
            _png(root / "img" / label / f"{i}.png", colour)
            lines.append(f"img/{label}/{i}.png,{label}")
    return _csv(root / "labels.csv", "path,label", lines)


# ----------------------------------------------------------------------------- listings
def test_listing_paths_resolve_against_its_folder_and_splits_are_kept(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _png(root / "a.png"), _png(root / "sub" / "b.png"), _png(tmp_path / "abs.png")
    csv = _csv(root / "labels.csv", "path,label,split",
               ["a.png,cat,train", "sub/b.png,dog,Test", f"{tmp_path / 'abs.png'},dog,TRAIN"])
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    splits = load_table(csv)
    assert sorted(splits["train"]["image"]) == sorted([str(root / "a.png"), str(tmp_path / "abs.png")])
    assert splits["test"]["image"] == [str(root / "sub" / "b.png")]
    assert splits["test"]["id"] == ["sub/b.png"] and splits["test"]["target"] == ["dog"]
    assert splits["train"].column_names == ["image", "target", "id"]


def test_no_split_column_gives_a_seeded_stratified_split(listing):
    splits = load_table(listing, test_fraction=0.2, seed=1)
    assert len(splits["train"]) == 24 and len(splits["test"]) == 6
    assert Counter(splits["test"]["target"]) == {"cat": 2, "dog": 2, "fox": 2}  # every class, in proportion
    again = load_table(listing, test_fraction=0.2, seed=1)
    assert again["test"]["id"] == splits["test"]["id"]  # deterministic
    other = load_table(listing, test_fraction=0.2, seed=2)
    assert set(other["test"]["id"]) != set(splits["test"]["id"])


def test_stratified_split_keeps_tiny_classes_in_train_and_never_empties_train():
    rows = [{"target": "big", "id": str(i)} for i in range(10)] + [{"target": "rare", "id": "r0"},
                                                                    {"target": "rare", "id": "r1"}]
    train, test = stratified_split(rows, test_fraction=0.5, seed=0)
    assert Counter(r["target"] for r in test) == {"big": 5}
    assert Counter(r["target"] for r in train) == {"big": 5, "rare": 2}
    with pytest.raises(ConfigError, match="between 0 and 1"):
        stratified_split(rows, test_fraction=1.0, seed=0)


def test_validation_rows_become_the_test_split_only_when_there_is_no_test(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
    only_val = _csv(tmp_path / "v.csv", "path,label,split", ["a.png,x,train", "b.png,y,validation", "c.png,x,train"])
    assert load_table(only_val)["test"]["id"] == ["b.png"]
    both = _csv(tmp_path / "b.csv", "path,label,split", ["a.png,x,train", "b.png,y,val", "c.png,x,test"])
    assert load_table(both)["test"]["id"] == ["c.png"]
    bad = _csv(tmp_path / "bad.csv", "path,label,split", ["a.png,x,train", "b.png,y,holdout"])
    with pytest.raises(DataError, match="unknown values in split column 'split': 'holdout'"):
        load_table(bad)


def test_jsonl_captions_with_configured_columns_and_a_template(tmp_path):
    _png(tmp_path / "i" / "1.png"), _png(tmp_path / "i" / "2.png"), _png(tmp_path / "i" / "3.png")
    rows = [{"file": f"i/{n}.png", "report": f"Finding {n}.", "view": "PA", "split": s}
            for n, s in ((1, "train"), (2, "train"), (3, "test"))]
    path = tmp_path / "reports.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = load_table(path, task="captioning", image_column="file", target_column="report")
    assert splits["train"]["target"] == ["Finding 1.", "Finding 2."] and splits["test"]["target"] == ["Finding 3."]
    templated = load_table(path, task="captioning", image_column="file", target_template="{view} view. {report}")
    assert templated["test"]["target"] == ["PA view. Finding 3."]
    with pytest.raises(DataError, match="missing: impression"):
        load_table(path, task="captioning", image_column="file", target_template="{impression}")


def test_column_errors_name_the_columns_and_the_flag(tmp_path):
    _png(tmp_path / "a.png")
    csv = _csv(tmp_path / "l.csv", "filename,diagnosys,split", ["a.png,x,train", "a.png,y,test"])
    with pytest.raises(DataError, match=r"no label column found .*columns: filename, diagnosys.*--target_column"):
        load_table(csv)
    with pytest.raises(DataError, match="Did you mean 'diagnosys'"):
        load_table(csv, target_column="diagnosis")
    assert load_table(csv, target_column="diagnosys")["train"]["target"] == ["x"]


def test_a_wrong_base_folder_is_explained(tmp_path):
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "lists").mkdir()
    csv = _csv(tmp_path / "lists" / "l.csv", "path,label", ["img/a.png,x", "img/a.png,y"])
    with pytest.raises(DataError, match="resolved against the listing's folder"):
        load_table(csv)


def test_bad_listings_are_named(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_table(empty)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"path": "a.png", "label": "x"}\n{not json}\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_table(broken)
    with pytest.raises(DataError, match="Listing not found"):
        load_table(tmp_path / "nope.csv")


def test_configured_labels_must_cover_the_data(listing):
    with pytest.raises(DataError, match="'fox' \\(10\\).*Add them to --labels"):
        load_table(listing, labels=("cat", "dog"))


# ----------------------------------------------------------------------------- image URLs
def test_urls_without_network_are_a_clear_error(tmp_path, monkeypatch):
    csv = _csv(tmp_path / "u.csv", "imageurl,label", ["http://127.0.0.1:9/a.png,x", "http://127.0.0.1:9/b.png,y"])
    with pytest.raises(NetworkError, match="could not be downloaded.*list local paths"):
        load_table(csv)
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(NetworkError, match="UNSLOTH_MED_OFFLINE is set"):
        load_table(csv)


def test_urls_are_downloaded_once_into_the_cache(tmp_path, monkeypatch, caplog):
    """Signed URLs (S3, GCS) carry an access token in their query: it is in no row id, prediction id or log line."""
    served = tmp_path / "www"
    for i in range(6):
        _png(served / f"p{i}.png", (i * 40, 0, 0))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        lines = [f"{base}/p{i}.png?X-Amz-Signature=SECRET{i},{'ab'[i % 2]}" for i in range(6)] + \
            [f"{base}/missing.png?X-Amz-Signature=SECRET9,a"]
        csv = _csv(tmp_path / "u.csv", "imageurl,label", lines)
        splits = load_table(csv, test_fraction=0.5)
    finally:
        server.shutdown()
        server.server_close()
    images = list(splits["train"]["image"]) + list(splits["test"]["image"])
    assert len(images) == 6 and len(splits["test"]) == 4  # the 404 row is dropped with a warning
    assert all(Path(p).is_file() and Path(p).is_relative_to(url_cache_path("x").parent) for p in images)
    ids = list(splits["train"]["id"]) + list(splits["test"]["id"])
    assert sorted(ids) == [f"{base}/p{i}.png" for i in range(6)]
    assert "SECRET" not in caplog.text
    again = load_table(csv, test_fraction=0.5)  # the server is gone: the cache answers (404 row still dropped)
    assert sorted(list(again["train"]["image"]) + list(again["test"]["image"])) == sorted(images)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ----------------------------------------------------------------------------- class folders
@pytest.mark.parametrize("layout", ["class_only", "class_then_split", "split_then_class"])
def test_class_folder_layouts(tmp_path, layout):
    root = tmp_path / "wrapper" / "wrapper"  # Kaggle-style single sub-folders are stepped through
    for label, colour in COLOURS.items():
        for i in range(6):
            split = "Test" if i == 5 else "Train"
            where = {"class_only": root / label,
                     "class_then_split": root / label / split,
                     "split_then_class": root / split.lower() / label}[layout]
            _png(where / f"{i}.png", colour)
    splits = load_folders(tmp_path / "wrapper", seed=0, test_fraction=0.2)
    assert Counter(splits["test"]["target"]) == {"cat": 1, "dog": 1, "fox": 1}
    assert Counter(splits["train"]["target"]) == {"cat": 5, "dog": 5, "fox": 5}
    if layout != "class_only":
        assert all(Path(p).stem == "5" for p in splits["test"]["image"])


def test_folders_without_images_and_captions_on_folders(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="No images found in class folders"):
        load_folders(tmp_path / "empty")
    _png(tmp_path / "f" / "cat" / "a.png")
    recipe = build_generic_recipe("caption", data_source=str(tmp_path / "f"))
    with pytest.raises(DataError, match="only a classification recipe"):
        load_recipe_data(recipe)


# ----------------------------------------------------------------------------- Hugging Face datasets
def test_caption_recipe_on_a_saved_hf_dataset_without_test_split(tmp_path):
    import datasets

    images = [Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(10)]
    ds = datasets.Dataset.from_dict({"picture": images, "report": [f"Report {i}." for i in range(10)]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "report": datasets.Value("string")}))
    ds.save_to_disk(tmp_path / "saved")
    recipe = build_generic_recipe("caption", data_source=str(tmp_path / "saved"), image_column="picture",
                                  target_column="report", test_fraction=0.2)
    splits = load_recipe_data(recipe)
    assert len(splits["train"]) == 8 and len(splits["test"]) == 2
    row = splits["test"][0]
    assert row["target"].startswith("Report") and isinstance(row["image"], dict) and row["image"]["bytes"]
    from unsloth_med.data.images import load_image

    assert load_image(row["image"]).size == (16, 16)


# ----------------------------------------------------------------------------- building recipes
def test_classify_recipe_reads_labels_and_fills_the_instruction(listing):
    recipe = build_generic_recipe("classify", data_source=str(listing))
    assert recipe.name == "classify" and recipe.task == "classification"
    assert recipe.labels == ("cat", "dog", "fox")
    assert recipe.instruction == CLASSIFY_INSTRUCTION.replace("{labels}", "cat, dog, fox")
    custom = build_generic_recipe("classification", data_source=str(listing), labels="fox, cat ,dog",
                                  instruction="Which animal? One of {labels}.")
    assert custom.labels == ("fox", "cat", "dog") and custom.instruction == "Which animal? One of fox, cat, dog."
    splits = load_recipe_data(custom)
    assert set(splits["train"]["target"]) == {"cat", "dog", "fox"}


def test_caption_recipe_defaults_and_bad_values():
    recipe = build_generic_recipe("caption", instruction="Write the findings.")
    assert recipe.task == "captioning" and recipe.labels == () and recipe.max_new_tokens == 128
    assert isinstance(recipe.source, TableSource) and recipe.source.kind == "auto"
    with pytest.raises(ConfigError, match="classify or caption"):
        build_generic_recipe("segment")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        build_generic_recipe("caption", test_fraction=2)
    with pytest.raises(ConfigError, match="remove \\{labels\\}"):
        build_generic_recipe("caption", instruction="One of {labels}")
    with pytest.raises(ConfigError, match="needs its classes: pass --data_dir"):
        resolve_recipe(placeholder("classify"), {"instruction": "One of {labels}"})
    with pytest.raises(ConfigError, match="no labels are known"):
        resolve_recipe(__import__("unsloth_med.recipes.bone_fracture", fromlist=["x"]).RECIPE.__class__(
            name="x", task="captioning", instruction="", source=TableSource(), default_model=""),
                       {"instruction": "{labels}"})


def test_parse_labels_forms():
    assert parse_labels(None) == () and parse_labels("") == ()
    assert parse_labels("a, b,,c, a") == ("a", "b", "c")
    assert parse_labels(["Spiral Fracture", "Oblique fracture"]) == ("Spiral Fracture", "Oblique fracture")
    assert parse_labels(["x,y"]) == ("x", "y")  # one flag value holding a comma-separated list


def test_resolve_recipe_from_config_values(listing):
    base = placeholder("classify")
    assert "{labels}" in base.instruction and base.labels == ()
    values = {"data_dir": str(listing), "labels": ["dog", "cat", "fox"], "instruction": "Pick: {labels}"}
    recipe = resolve_recipe(base, values)
    assert recipe.labels == ("dog", "cat", "fox") and recipe.instruction == "Pick: dog, cat, fox"
    config = SimpleNamespace(data=SimpleNamespace(data_dir=str(listing), labels=None, instruction=None,
                                                  test_fraction=0.3), training=SimpleNamespace(seed=5))
    recipe = resolve_recipe(base, config)
    assert recipe.labels == ("cat", "dog", "fox") and recipe.source.test_fraction == 0.3
    record_resolved(config, recipe)
    assert config.data.labels == ["cat", "dog", "fox"] and config.data.instruction == recipe.instruction
    # Rebuilt later from the recorded values alone (no data needed): what predict does with config.yaml.
    again = resolve_recipe(placeholder("classify"),
                           {"labels": config.data.labels, "instruction": config.data.instruction})
    assert again.labels == recipe.labels and again.instruction == recipe.instruction


def test_other_recipes_only_take_an_instruction_override():
    from unsloth_med.recipes.bone_fracture import RECIPE

    assert resolve_recipe(RECIPE, {"data_dir": "x", "labels": ["a"]}) is RECIPE
    changed = resolve_recipe(RECIPE, {"instruction": "Fracture type? {labels}"})
    assert changed.instruction.startswith("Fracture type? Avulsion fracture, ") and changed.labels == RECIPE.labels


def test_recipe_registry_and_presets():
    from unsloth_med.config import DataArgs, presets_dir
    from unsloth_med.recipes import BUILTIN, get_recipe

    assert {"classify", "caption", "product_catalog"} <= set(BUILTIN)
    assert get_recipe("product_catalog").name == "product_catalog"
    for name in BUILTIN:
        quick = presets_dir() / name / "quick.yaml"
        # A quick trial trains eager: its 30 steps do not earn back compiling (benchmarks/README.md, session 10).
        assert yaml.safe_load(quick.read_text())["model"]["train_compiled"] is False
    assert all(hasattr(DataArgs(), f) for f in ("labels", "instruction", "image_column", "target_column"))
    assert get_recipe("classify").name == "classify" and get_recipe("caption").task == "captioning"
    assert {p.parent.name for p in SHIPPED_CONFIGS} <= set(BUILTIN)  # every preset folder names a recipe


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_parses_through_the_real_loader(path, tmp_path):
    """Each preset and config goes through parse_config (TRL's parser and TrainingArguments' checks), and
    every value it sets arrives in the resolved config unchanged."""
    import yaml

    from unsloth_med.config import parse_config
    from unsloth_med.recipes import get_recipe

    config = parse_config(["--config", str(path), "--output_dir", str(tmp_path / "run")], get_recipe(path.parent.name))
    resolved = config.to_dict()
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, value in values.items():
            got = resolved[section][key]
            assert got == value or got == [value] or (isinstance(value, float) and got == pytest.approx(value)), \
                f"{path.name}: {section}.{key} = {value!r} resolved to {got!r}"


def test_shipped_configs_are_found():
    assert len(SHIPPED_CONFIGS) >= 10 and any(p.name == "demo.yaml" for p in SHIPPED_CONFIGS)


def test_command_line_usage():
    assert main(["--help"]) == 0
    assert main(["segment"]) == 2


# ----------------------------------------------------------------------------- real data
def test_real_bone_break_csv_matches_the_folder_layout(bone_break_dir):
    from unsloth_med.recipes.bone_fracture import CLASSES

    recipe = build_generic_recipe("classify", data_source=str(bone_break_dir / "labels.csv"))
    assert recipe.labels == tuple(sorted(CLASSES))
    from_csv = load_recipe_data(recipe)
    assert (len(from_csv["train"]), len(from_csv["test"])) == (989, 140)
    from_folders = load_recipe_data(recipe, str(bone_break_dir / "Bone Break Classification"))  # no listing there
    for split in ("train", "test"):
        assert sorted(zip(from_csv[split]["image"], from_csv[split]["target"])) == \
            sorted(zip(from_folders[split]["image"], from_folders[split]["target"]))


@pytest.mark.slow
def test_classify_trains_a_tiny_model_on_the_real_bone_break_csv(bone_break_dir, tiny_path, tmp_path):
    """The whole job from the command line: CSV listing -> data checks -> eval -> 3 steps -> eval -> report."""
    tiny_path("mistral3")  # build once, outside the timed run
    out = tmp_path / "run"
    argv = ["classify", "--data_dir", str(bone_break_dir / "labels.csv"), "--model", "tiny:mistral3",
            "--max_steps", "3", "--max_train_samples", "16", "--max_eval_samples", "10", "--image_size", "64",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--eval_batch_size", "10",
            "--save_strategy", "no", "--output_dir", str(out)]
    assert main(argv) == 0
    status = json.loads((out / "run.json").read_text())
    assert status["complete"] is True and status["recipe"] == "classify"
    after = json.loads((out / "eval_after.json").read_text())
    assert len(after["predictions"]) == 10
    from unsloth_med.recipes.bone_fracture import CLASSES

    assert {p["prediction"] for p in after["predictions"]} <= set(CLASSES)
    losses = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in losses) == 3
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["run"]["recipe"] == "classify" and config["data"]["data_dir"].endswith("labels.csv")
    assert config["data"]["labels"] == sorted(CLASSES)
