"""Product catalog: from a product photo to "Product: {title}, Category: {category}, Full Price: {price}".

After the Phi-3-Vision fine-tuning tutorial on the Burberry catalog (HF `DBQ/Burberry.Product.prices.United.States`;
its image URLs are downloaded once into the cache), or your own CSV/JSONL listing with title, category and price
columns and an image column (a path relative to the listing, or a URL). Phi-3-Vision needs remote code under
transformers 5.17, so the default model is Qwen2.5-VL-7B-Instruct (natively supported, strong at product text).

    python -c "from unsloth_med.data.synthetic_catalog import write_demo_catalog as w; print(w('data/catalog'))"
    python -m unsloth_med.recipes.product_catalog --data_dir data/catalog/catalog.csv --model tiny:qwen2_5_vl
"""
from __future__ import annotations

from typing import Any, Sequence

from ..data.templates import read_fields, read_number
from .base import Recipe, TableSource

TEMPLATE = "Product: {title}, Category: {category}, Full Price: {price}"
FIELDS = ("title", "category", "price")
# Template name -> columns to take it from, in order (the first the row fills wins).
COLUMN_ALIASES = (
    ("title", ("title", "product_title", "product_name", "name")),
    ("category", ("category3_code", "category", "category_code", "category2_code", "category1_code")),
    ("price", ("full_price", "price", "full_price_usd")),
    ("image", ("imageurl", "image_url", "image", "path", "image_path", "file")),
)

INSTRUCTION = (
    "You are a product cataloguer. Identify the product in this photo and reply in exactly this format: "
    "Product: <title>, Category: <category code>, Full Price: <price in US dollars>"
)

SOURCE = TableSource(
    kind="table",
    id="DBQ/Burberry.Product.prices.United.States",
    image_column="",  # detected through COLUMN_ALIASES["image"]
    target_template=TEMPLATE,
    column_aliases=COLUMN_ALIASES,
    train_split="train",
    test_split="test",
    test_fraction=0.1,
    attribution=(
        "DBQ/Burberry.Product.prices.United.States (Hugging Face; product data by Data Boutique), see its dataset "
        "card for the license; product images belong to their owners. Your own catalog: state its source."
    ),
)


# ----------------------------------------------------------------------------- the metric
def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def catalog_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Exact match (whole answer and per field), format rate and price MAE of catalog answers.

    - exact_match: all three fields match; <field>_exact_match: that field matches (text ignoring case and
      repeated spaces, prices as numbers: "1890" == "$1,890.00"). An answer not in the format misses every field.
    - format_ok: the fraction of predictions in which all three fields could be found.
    - price_mae: mean |predicted - true| over the predictions whose price parsed (price_mae_n of them), or None.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    counts = dict.fromkeys(("all", "format", *FIELDS), 0)
    errors: list[float] = []
    for pred, ref in zip(predictions, references):
        p, r = read_fields(pred, TEMPLATE), read_fields(ref, TEMPLATE)
        if r is None:
            raise ValueError(f"reference is not a catalog answer ({TEMPLATE}): {ref!r}")
        if p is None:
            continue
        price, true_price = read_number(p["price"]), read_number(r["price"])
        priced = price is not None and true_price is not None
        if priced:
            errors.append(abs(price - true_price))
        ok = {"title": _same_text(p["title"], r["title"]), "category": _same_text(p["category"], r["category"]),
              "price": priced and abs(price - true_price) < 0.005}
        for key in FIELDS:
            counts[key] += ok[key]
        counts["all"] += all(ok.values())
        counts["format"] += 1
    n = len(predictions)
    rate = {key: count / n if n else 0.0 for key, count in counts.items()}
    return {"n": n, "exact_match": rate["all"], **{f"{f}_exact_match": rate[f] for f in FIELDS},
            "format_ok": rate["format"],
            "price_mae": sum(errors) / len(errors) if errors else None, "price_mae_n": len(errors)}

RECIPE = Recipe(
    name="product_catalog",
    task="captioning",
    instruction=INSTRUCTION,
    source=SOURCE,
    default_model="unsloth/Qwen2.5-VL-7B-Instruct",
    default_model_4bit="unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit",
    image_size=448,
    max_new_tokens=64,
    score_text=catalog_metrics,
)

if __name__ == "__main__":
    from ..cli import recipe_main

    recipe_main(RECIPE)
