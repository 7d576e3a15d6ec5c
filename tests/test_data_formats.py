"""Data formats users bring: OpenAI/LLaMA-Factory `messages` with <image> marks, LLaVA image lists, image URLs
in every image of a row, Hugging Face datasets (extra columns, a lone validation split, leak counts by content),
and the split settings of the table-based recipes. Real files, real datasets, the project's own loaders."""
from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from unsloth_med.errors import DataError

COLOURS = ("red", "blue", "green", "white", "black", "yellow")


def _image(path: Path, colour: str, mark: int = 0) -> str:
    img = Image.new("RGB", (48, 40), colour)
    ImageDraw.Draw(img).rectangle([mark, mark, mark + 6, mark + 6], fill="gray")
    img.save(path)
    return str(path)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parts(row: dict) -> list[list]:
    """Per turn: the content parts as 'image' or the text, in order."""
    return [[p["text"] if p["type"] == "text" else "image" for p in m["content"]] for m in json.loads(row["messages"])]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UNSLOTH_MED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """(folder, base URL): a real HTTP server on 127.0.0.1 serving the folder, for the test's duration."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- conversations
def test_openai_string_content_puts_each_image_at_its_mark(tmp_path):
    """LLaMA-Factory's multimodal shape: `messages` with string content holding <image> marks, and `images`."""
    from unsloth_med.data.tables import load_table

    first, second = _image(tmp_path / "a.png", "red"), _image(tmp_path / "b.png", "blue")
    turns = [{"role": "user", "content": "<image>What colour is this?"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "And this one? <image>"}, {"role": "assistant", "content": "blue"}]
    listing = _jsonl(tmp_path / "lf.jsonl", [{"messages": turns, "images": ["a.png", "b.png"], "split": s}
                                             for s in ("train", "test")])
    row = load_table(listing, task="vqa")["train"][0]
    assert _parts(row) == [["image", "What colour is this?"], ["red"], ["And this one?", "image"], ["blue"]]
    assert "<image>" not in row["messages"] and row["question"] == "And this one?" and row["target"] == "blue"
    assert row["image"] == first and json.loads(row["more_images"]) == [second]


def test_llava_image_column_holding_a_list_of_images(tmp_path):
    """LLaVA-OneVision writes several images as `"image": [...]`, as `images` does elsewhere."""
    from unsloth_med.data.tables import load_table

    first, second = _image(tmp_path / "a.png", "red"), _image(tmp_path / "b.png", "blue")
    rows = [{"id": f"s{i}", "image": ["a.png", "b.png"], "split": "test" if i else "train",
             "conversations": [{"from": "human", "value": "<image>\n<image>\nSame colour?"},
                               {"from": "gpt", "value": "no"}]} for i in range(2)]
    (tmp_path / "ov.json").write_text(json.dumps(rows))
    row = load_table(tmp_path / "ov.json", task="vqa")["train"][0]
    assert row["image"] == first and json.loads(row["more_images"]) == [second]
    assert _parts(row) == [["image", "image", "Same colour?"], ["no"]]


def test_image_url_part_given_as_a_plain_string(tmp_path):
    from unsloth_med.data.tables import load_table

    first = _image(tmp_path / "img0.png", "red")
    turns = [{"role": "user", "content": [{"type": "image_url", "image_url": "img0.png"},
                                          {"type": "text", "text": "Colour?"}]},
             {"role": "assistant", "content": "red"}]
    listing = _jsonl(tmp_path / "chat.jsonl", [{"messages": turns, "split": s} for s in ("train", "test")])
    row = load_table(listing, task="vqa")["train"][0]
    assert row["image"] == first and _parts(row) == [["image", "Colour?"], ["red"]]


def test_a_content_part_that_is_not_an_object_is_a_data_error(tmp_path):
    from unsloth_med.data.tables import load_table

    _image(tmp_path / "img0.png", "red")
    turns = [{"role": "user", "content": ["What colour?"]}, {"role": "assistant", "content": "red"}]
    listing = _jsonl(tmp_path / "chat.jsonl", [{"messages": turns, "image": "img0.png"}])
    with pytest.raises(DataError, match=r"chat\.jsonl, row 1, 'messages' turn 1: a content part is a str "
                                     r"\('What colour\?'\), not an object\. Write each part as \{\"type\": \"text\""):
        load_table(listing, task="vqa")


def test_a_turn_that_is_not_an_object_is_a_data_error(tmp_path):
    from unsloth_med.data.tables import load_table

    _image(tmp_path / "img0.png", "red")
    listing = _jsonl(tmp_path / "chat.jsonl", [{"messages": ["What colour?", {"role": "assistant", "content": "red"}],
                                                "image": "img0.png"}])
    with pytest.raises(DataError, match=r"chat\.jsonl, row 1: turn 1 of 'messages' is a str \('What colour\?'\), "
                                     r"not an object\. Write each turn as \{\"role\": \.\.\., \"content\": \.\.\.\} "):
        load_table(listing, task="vqa")


def test_unknown_split_values_in_a_conversation_listing_are_named(tmp_path):
    from unsloth_med.data.tables import load_table

    _image(tmp_path / "img0.png", "red")
    rows = [{"image": "img0.png", "split": split, "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                    {"from": "gpt", "value": f"c{i}"}]}
            for i, split in enumerate(("train", "train", "holdout", "holdout"))]
    with pytest.raises(DataError, match=r"unknown values in split column 'split': 'holdout' \(2\)\. Use train or test"):
        load_table(_jsonl(tmp_path / "sp.jsonl", rows), task="vqa")


# ----------------------------------------------------------------------------- image URLs
def test_every_image_url_of_a_conversation_listing_is_downloaded(tmp_path, cache, served):
    """Two URL images per row (OpenAI image_url parts): the second one (`more_images`) is downloaded too, and a
    row whose second image cannot be fetched is dropped, not trained with a URL no loader can read."""
    from unsloth_med.data.tables import load_table
    from unsloth_med.data.validate import validate_splits

    folder, base = served
    for i in range(4):
        _image(folder / f"img{i}.png", COLOURS[i])
    rows = []
    for i, split in enumerate(("train", "train", "train", "train", "test", "test", "train")):
        second = f"{base}/img{(i + 1) % 4}.png" if i < 6 else f"{base}/missing.png"
        rows.append({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{base}/img{i % 4}.png"}},
            {"type": "image_url", "image_url": {"url": second}}, {"type": "text", "text": "Same colour?"}]},
            {"role": "assistant", "content": "no"}], "split": split})
    splits = load_table(_jsonl(tmp_path / "oa.jsonl", rows), task="vqa")
    assert len(splits["train"]) == 4 and len(splits["test"]) == 2  # the row with the missing image is dropped
    for row in list(splits["train"]) + list(splits["test"]):
        images = [row["image"], *json.loads(row["more_images"])]
        assert len(images) == 2 and all(Path(p).is_file() and Path(p).parent == cache / "images" for p in images)
    clean, skipped = validate_splits(dict(splits), image_size=64, max_bad_fraction=1.0)
    assert skipped == [] and len(clean["train"]) == 4


def test_image_urls_of_a_saved_hf_conversation_dataset_are_downloaded(tmp_path, cache, served):
    import datasets

    from unsloth_med.data.tables import load_hf_table

    folder, base = served
    for i in range(4):
        _image(folder / f"img{i}.png", COLOURS[i])
    rows = {"images": [[f"{base}/img{i % 4}.png", f"{base}/img{(i + 1) % 4}.png"] for i in range(8)],
            "conversations": [[{"from": "human", "value": "<image>\n<image>\nSame colour?"},
                               {"from": "gpt", "value": f"c{i}"}] for i in range(8)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hfconv"))
    splits = load_hf_table(str(tmp_path / "hfconv"), task="vqa", test_fraction=0.25)
    assert len(splits["train"]) + len(splits["test"]) == 8
    for row in list(splits["train"]) + list(splits["test"]):
        images = [row["image"], *json.loads(row["more_images"])]
        assert len(images) == 2 and all(Path(p).is_file() and Path(p).parent == cache / "images" for p in images)


# ----------------------------------------------------------------------------- Hugging Face datasets
def _vqa_rad_like(tmp_path: Path, *, as_paths: bool = False, splits=("train", "test")) -> Path:
    """Six images, three questions each, a `modality` column; the test split reuses training images (VQA-RAD)."""
    import datasets

    paths = [_image(tmp_path / f"{c}.png", c, mark=4 * i) for i, c in enumerate(COLOURS)]
    rows = {"image": [], "question": [], "answer": [], "modality": []}
    for i, path in enumerate(paths):
        for question, answer in (("Is this red?", "yes" if i == 0 else "no"), ("What colour?", COLOURS[i]),
                                 ("Is it round?", "no")):
            rows["image"].append(path)
            rows["question"].append(question)
            rows["answer"].append(answer)
            rows["modality"].append("CT" if i % 2 else "MRI")
    features = datasets.Features({"image": datasets.Value("string") if as_paths else datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "modality": datasets.Value("string")})
    full = datasets.Dataset.from_dict(rows, features=features)
    parts = {"train": full, "test": full.select([0, 1, 3, 4, 15, 16]), "validation": full}
    saved = tmp_path / "hfvqa"
    datasets.DatasetDict({name: parts[name] for name in splits}).save_to_disk(str(saved))
    return saved


def test_leak_counts_count_distinct_hf_images_by_content(tmp_path):
    """Six test questions about three images stored as bytes: three test images, and the --split_by image hint."""
    from unsloth_med.data.checks import leak_counts, leak_message, leaked_test_images
    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.recipes import get_recipe

    splits = load_recipe_data(get_recipe("radiology_vqa"), str(_vqa_rad_like(tmp_path)))
    counts = leak_counts(splits["test"], leaked_test_images(splits))
    assert counts == {"test_images": 3, "leaked_images": 3, "test_rows": 6, "leaked_rows": 6}
    assert "3 of 3 test images (carrying 6 of 6 test rows)" in leak_message(counts)
    assert "--split_by image" in leak_message(counts)


@pytest.mark.parametrize("as_paths", [False, True], ids=["image-feature", "path-column"])
def test_hf_vqa_datasets_carry_every_column_for_the_instruction(tmp_path, as_paths):
    """`--instruction "Modality: {modality}. {question}"` works on a HF dataset as on a listing."""
    import dataclasses

    from unsloth_med.data.samples import check_placeholders
    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.recipes import get_recipe

    saved = _vqa_rad_like(tmp_path, as_paths=as_paths)
    recipe = dataclasses.replace(get_recipe("vqa"), instruction="Modality: {modality}. {question}")
    splits = load_recipe_data(recipe, str(saved))
    check_placeholders(recipe.instruction, splits["train"].column_names, str(saved))
    row = splits["test"][2]
    assert row["modality"] == "CT" and row["question"] == "Is this red?" and row["target"] == "no"
    assert recipe.prompt(example=row)[0]["content"][-1]["text"] == "Modality: CT. Is this red?"
    assert set(splits["train"].column_names) >= {"image", "target", "id", "question", "answer_type", "modality"}


@pytest.mark.parametrize("task", ["captioning", "vqa-conversations"])
def test_an_hf_dataset_with_only_a_validation_split_holds_out_a_test_split(tmp_path, task):
    import datasets

    from unsloth_med.data.tables import load_hf_table

    if task == "captioning":
        saved = _vqa_rad_like(tmp_path, splits=("validation",))
        out = load_hf_table(str(saved), task="captioning", image_column="image", target_column="answer",
                            test_fraction=0.25)
        total = 18
    else:
        paths = [_image(tmp_path / f"{c}.png", c) for c in COLOURS]
        rows = {"image": paths, "conversations": [[{"from": "human", "value": "<image>\nColour?"},
                                                   {"from": "gpt", "value": c}] for c in COLOURS]}
        saved = tmp_path / "valconv"
        datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(saved))
        out = load_hf_table(str(saved), task="vqa", test_fraction=0.34)
        total = 6
    train_ids, test_ids = set(out["train"]["id"]), set(out["test"]["id"])
    assert len(out["train"]) + len(out["test"]) == total and len(out["test"]) >= 1
    assert not train_ids & test_ids


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["vqa", "radiology_vqa", "product_catalog"])
def test_table_recipes_take_the_split_column_and_test_fraction_from_the_config(name):
    from unsloth_med.recipes import get_recipe
    from unsloth_med.recipes.resolve import resolve_recipe

    recipe = resolve_recipe(get_recipe(name), {"split_column": "fold", "test_fraction": 0.3})
    assert recipe.source.split_column == "fold" and recipe.source.test_fraction == 0.3
    ignored = resolve_recipe(get_recipe(name), {"split_column": ""})  # '' means: ignore the split column
    assert ignored.source.split_column == ""


def test_vqa_recipe_splits_a_listing_by_the_configured_column_and_fraction(tmp_path):
    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.recipes import get_recipe
    from unsloth_med.recipes.resolve import resolve_recipe

    lines = ["image,question,answer,part"]
    for i in range(8):
        _image(tmp_path / f"img{i}.png", COLOURS[i % 6], mark=3 * i)
        lines.append(f"img{i}.png,q{i},{'yes' if i % 2 else 'no'},{'test' if i >= 6 else 'train'}")
    listing = tmp_path / "qa.csv"
    listing.write_text("\n".join(lines) + "\n")
    by_part = load_recipe_data(resolve_recipe(get_recipe("vqa"), {"split_column": "part"}), str(listing))
    assert sorted(by_part["test"]["question"]) == ["q6", "q7"] and len(by_part["train"]) == 6
    held = load_recipe_data(resolve_recipe(get_recipe("vqa"), {"split_column": "", "test_fraction": 0.5}),
                            str(listing))
    assert len(held["test"]) == 4 and len(held["train"]) == 4
