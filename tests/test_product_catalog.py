"""The product_catalog recipe: catalog targets from columns, its metrics, and a whole run on a generated catalog."""
from __future__ import annotations

import csv
import json

import pytest

from unsloth_med.data.sources import load_recipe_data
from unsloth_med.data.synthetic_catalog import write_demo_catalog
from unsloth_med.data.templates import read_fields, read_number, template_labels
from unsloth_med.errors import NetworkError
from unsloth_med.recipes.product_catalog import RECIPE, TEMPLATE, catalog_metrics


def parse_catalog_text(text):
    return read_fields(text, TEMPLATE)


def test_answers_are_read_back_at_the_template_labels():
    assert template_labels(TEMPLATE) == (("title", "Product:"), ("category", "Category:"), ("price", "Full Price:"))
    assert parse_catalog_text("Product: Red Bag, large, Category: BAGS, Full Price: $1,890.00") == {
        "title": "Red Bag, large", "category": "BAGS", "price": "$1,890.00"}
    assert parse_catalog_text("  product:X,   category : Y ,full price: 10") == {"title": "X", "category": "Y",
                                                                                 "price": "10"}
    # Any order, text before the first label, a label repeated (its first value kept).
    assert parse_catalog_text("Sure! Category: BAGS; Full Price: 10, Product: Tote\nProduct: other") == {
        "title": "Tote", "category": "BAGS", "price": "10"}
    assert parse_catalog_text("Product: X, Full Price: 10") is None  # a field is missing
    assert parse_catalog_text("no idea") is None


def test_other_templates_are_read_back_too():
    template = "Findings: {findings}\nImpression: {impression}"
    assert read_fields("findings: No fracture, no effusion. IMPRESSION: normal", template) == {
        "findings": "No fracture, no effusion.", "impression": "normal"}
    with pytest.raises(ValueError, match="no label before {b}"):
        template_labels("A: {a}{b}")


@pytest.mark.parametrize("text, value", [("1890", 1890.0), ("$1,890.00", 1890.0), ("USD 49.5", 49.5),
                                         ("free", None), ("", None), (None, None)])
def test_read_number(text, value):
    assert read_number(text) == value


def test_catalog_metrics_known_answers():
    refs = ["Product: Red Bag, Category: BAGS, Full Price: 1890.00",
            "Product: Blue Coat, Category: COATS, Full Price: 2290.00",
            "Product: Green Scarf, Category: SCARVES, Full Price: 490.00",
            "Product: Black Shoe, Category: SHOES, Full Price: 650.00"]
    preds = ["product: red  bag, Category: BAGS, Full Price: $1,890",  # all fields right (case/space/format)
             "Product: Blue Coat, Category: BAGS, Full Price: 2190.00",  # category wrong, price off by 100
             "a green scarf",  # not in the format
             "Product: Black Shoe, Category: SHOES, Full Price: 700"]  # price off by 50
    m = catalog_metrics(preds, refs)
    assert m["n"] == 4
    assert m["exact_match"] == pytest.approx(1 / 4)
    assert m["title_exact_match"] == pytest.approx(3 / 4)
    assert m["category_exact_match"] == pytest.approx(2 / 4)
    assert m["price_exact_match"] == pytest.approx(1 / 4)
    assert m["format_ok"] == pytest.approx(3 / 4)
    assert m["price_mae"] == pytest.approx((0 + 100 + 50) / 3) and m["price_mae_n"] == 3
    assert RECIPE.score_text(preds, refs) == m  # the hook the captioning evaluation calls
    empty = catalog_metrics([], [])
    assert empty["n"] == 0 and empty["price_mae"] is None
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        catalog_metrics(["a", "b"], [refs[0]])


def test_recipe_is_a_captioning_recipe_with_the_tutorial_template():
    assert RECIPE.name == "product_catalog" and RECIPE.task == "captioning" and not RECIPE.labels
    assert RECIPE.source.target_template == TEMPLATE == "Product: {title}, Category: {category}, Full Price: {price}"
    assert RECIPE.source.id == "DBQ/Burberry.Product.prices.United.States"


def test_generated_catalog_loads_with_the_template(tmp_path):
    path = write_demo_catalog(tmp_path / "cat", n=20, with_split=True)
    splits = load_recipe_data(RECIPE, str(path))
    assert (len(splits["train"]), len(splits["test"])) == (16, 4)
    target = splits["train"][0]["target"]
    assert parse_catalog_text(target) is not None and target.startswith("Product: ")
    rows = list(csv.DictReader(path.open()))
    first = next(r for r in rows if r["image"] == splits["train"][0]["id"])
    assert target == TEMPLATE.format(**first)
    # The folder works too (its single listing is used).
    assert len(load_recipe_data(RECIPE, str(path.parent))["train"]) == 16


def _burberry_like(tmp_path, image_values):
    """Rows with the Burberry dataset's columns (title, category3_code, full_price, price, imageurl)."""
    return [{"brand": "Burberry", "category1_code": "WOMEN", "category3_code": f"CAT{i % 2}",
             "title": f"Item {i}", "full_price": 1000.0 + i, "price": 500.0 + i, "imageurl": image}
            for i, image in enumerate(image_values)]


def test_hf_dataset_with_burberry_columns_uses_full_price_and_category3_code(tmp_path):
    import datasets

    images = [str(p) for p in sorted((write_demo_catalog(tmp_path / "c", n=8).parent / "images").iterdir())]
    datasets.Dataset.from_list(_burberry_like(tmp_path, images)).save_to_disk(tmp_path / "burberry")
    splits = load_recipe_data(RECIPE, str(tmp_path / "burberry"))
    targets = sorted(list(splits["train"]["target"]) + list(splits["test"]["target"]))
    assert targets[0] == "Product: Item 0, Category: CAT0, Full Price: 1000.0"  # full_price, not the sale price
    assert len(splits["test"]) >= 1


def test_image_urls_offline_are_a_clear_error(tmp_path):
    import datasets

    rows = _burberry_like(tmp_path, [f"http://127.0.0.1:9/img{i}.jpg" for i in range(4)])
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "burberry")
    with pytest.raises(NetworkError, match="could not be downloaded.*local paths"):
        load_recipe_data(RECIPE, str(tmp_path / "burberry"))


def test_default_dataset_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkError, match="DBQ/Burberry.*save_to_disk"):
        load_recipe_data(RECIPE)


@pytest.mark.slow
def test_product_catalog_runs_end_to_end_on_a_generated_catalog(tiny_path, tmp_path):
    from unsloth_med.cli import train_command

    tiny_path("mistral3")
    csv_path = write_demo_catalog(tmp_path / "catalog", n=24, size=64, with_split=True)
    out = tmp_path / "run"
    argv = ["--data_dir", str(csv_path), "--model", "tiny:mistral3", "--max_steps", "3", "--image_size", "64",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3",
            "--save_strategy", "no", "--eval_before", "false", "--max_eval_samples", "4", "--eval_batch_size", "4",
            "--max_new_tokens", "24", "--output_dir", str(out)]
    assert train_command(argv, RECIPE) == 0
    status = json.loads((out / "run.json").read_text())
    assert status["complete"] is True and status["recipe"] == "product_catalog"
    after = json.loads((out / "eval_after.json").read_text())
    predictions = after["predictions"]
    assert len(predictions) == 4 and all(parse_catalog_text(p["target"]) for p in predictions)
    scores = RECIPE.score_text([p["prediction"] for p in predictions], [p["target"] for p in predictions])
    assert scores["n"] == 4 and 0.0 <= scores["exact_match"] <= 1.0 and "price_mae" in scores
    assert "bleu" in after["metrics"] and "rougeL" in after["metrics"]
    assert after["metrics"]["exact_match"] == scores["exact_match"] and "price_mae" in after["metrics"]
    assert sum("loss" in json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()) == 3


def test_a_recipe_subclass_with_a_score_text_method_still_reports_its_metrics(tiny_path, tmp_path):
    """Before score_text was a Recipe field, a recipe added metrics by defining the method on a subclass (the README
    said so). The field's None must not hide that method: a tiny model's captioning evaluation reports them."""
    import dataclasses

    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import ModelArgs
    from unsloth_med.evaluate import evaluate
    from unsloth_med.recipes.base import Recipe

    @dataclasses.dataclass(frozen=True)
    class FieldsRecipe(Recipe):
        def score_text(self, predictions, references):
            return {"answers_scored": len(predictions), "recipe_name": self.name}

    recipe = FieldsRecipe(name="catalog_fields", task="captioning", instruction=RECIPE.instruction,
                          source=RECIPE.source, default_model="", image_size=64, max_new_tokens=4)
    assert dataclasses.replace(recipe, name="renamed").score_text([], []) == {"answers_scored": 0,
                                                                              "recipe_name": "renamed"}
    rows = load_recipe_data(recipe, str(write_demo_catalog(tmp_path / "c", n=10, size=48, with_split=True)))["test"]
    model, processor = HFBackend().load(str(tiny_path("mistral3")), ModelArgs())
    metrics = evaluate(model, processor, recipe, rows, batch_size=2, image_size=64, progress=False)["metrics"]
    assert metrics["answers_scored"] == len(rows) == 2 and metrics["recipe_name"] == "catalog_fields"
    assert "bleu" in metrics and "rougeL" in metrics
