"""Product catalog: from a product photo to "Product: {title}, Category: {category}, Full Price: {price}".

After the Phi-3-Vision fine-tuning tutorial on the Burberry catalog (Hugging Face
`DBQ/Burberry.Product.prices.United.States`: title, category3_code, full_price, imageurl). Data: that
dataset (images are URLs: downloaded once into the cache, so it needs network the first time), or
your own CSV/JSONL listing with columns title, category (or category3_code), price (or full_price)
and an image column (path relative to the listing, or URL):

    python -m unsloth_med.recipes.product_catalog --data_dir catalog.csv
    python -c "from unsloth_med.recipes.product_catalog import write_demo_catalog as w; print(w('data/catalog'))"
    python -m unsloth_med.recipes.product_catalog --data_dir data/catalog/catalog.csv --model tiny:qwen2_5_vl

Phi-3/3.5-Vision itself cannot be loaded natively by transformers 5.17 (remote code only), so the
default model is Qwen2.5-VL-7B-Instruct, a natively supported family with strong OCR of product text.

Metrics (`score_text`, called by the captioning evaluation next to BLEU/ROUGE-L): exact match of the
whole answer and of each field (title, category, price; case- and space-insensitive, prices compared
as numbers), the fraction of answers in the expected format, and the price mean absolute error.
"""
from __future__ import annotations

import csv
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .base import Recipe
from .generic import TableSource

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


# ----------------------------------------------------------------------------- parsing and metrics
_LABELS = re.compile(r"(product|category|full\s*price)\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def parse_catalog_text(text: str) -> dict[str, str] | None:
    """{'title', 'category', 'price'} from "Product: ..., Category: ..., Full Price: ..." (None if a field is missing).

    Fields are cut at the next field label, so titles may contain commas."""
    text = " ".join(str(text).split())
    marks = [(m.group(1).lower().replace(" ", ""), m.start(), m.end()) for m in _LABELS.finditer(text)]
    found: dict[str, str] = {}
    names = {"product": "title", "category": "category", "fullprice": "price"}
    for i, (label, _, end) in enumerate(marks):
        stop = marks[i + 1][1] if i + 1 < len(marks) else len(text)
        key = names[label]
        if key not in found:
            found[key] = text[end:stop].strip().rstrip(",").strip()
    return found if all(k in found for k in FIELDS) else None


def parse_price(text: Any) -> float | None:
    """The first number in a price text ('$1,890.00' -> 1890.0); None when there is none."""
    if text is None:
        return None
    match = _NUMBER.search(str(text))
    if not match:
        return None
    try:
        value = float(match.group(0).replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _same_text(a: str, b: str) -> bool:
    return " ".join(str(a).split()).casefold() == " ".join(str(b).split()).casefold()


def _same_price(a: str, b: str) -> bool:
    pa, pb = parse_price(a), parse_price(b)
    return pa is not None and pb is not None and abs(pa - pb) < 0.005


def catalog_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Exact match (whole answer and per field), format rate and price MAE of catalog answers.

    - exact_match: all three fields match; <field>_exact_match: that field matches (text fields ignoring
      case and repeated spaces, prices as numbers: "1890" == "1,890.00").
    - format_ok: the fraction of predictions in which all three fields could be found.
    - price_mae: mean |predicted - true| over the predictions whose price parsed (price_mae_n of them),
      None when none did. Unparseable answers count as misses in every exact-match rate.
    """
    predictions, references = [str(p) for p in predictions], [str(r) for r in references]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(predictions)
    hits = {f: 0 for f in FIELDS}
    all_hits = parsed_ok = 0
    errors: list[float] = []
    for pred, ref in zip(predictions, references):
        p, r = parse_catalog_text(pred), parse_catalog_text(ref)
        if r is None:
            raise ValueError(f"reference is not a catalog answer ({TEMPLATE}): {ref!r}")
        if p is None:
            continue
        parsed_ok += 1
        ok = {"title": _same_text(p["title"], r["title"]), "category": _same_text(p["category"], r["category"]),
              "price": _same_price(p["price"], r["price"])}
        for f in FIELDS:
            hits[f] += ok[f]
        all_hits += all(ok.values())
        pp, rp = parse_price(p["price"]), parse_price(r["price"])
        if pp is not None and rp is not None:
            errors.append(abs(pp - rp))
    rate = (lambda k: k / n) if n else (lambda k: 0.0)
    return {
        "n": n,
        "exact_match": rate(all_hits),
        **{f"{f}_exact_match": rate(hits[f]) for f in FIELDS},
        "format_ok": rate(parsed_ok),
        "price_mae": (sum(errors) / len(errors)) if errors else None,
        "price_mae_n": len(errors),
    }


@dataclass(frozen=True)
class CatalogRecipe(Recipe):
    """A captioning recipe with structured-answer metrics (the `score_text` hook)."""

    def score_text(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        return catalog_metrics(predictions, references)


RECIPE = CatalogRecipe(
    name="product_catalog",
    task="captioning",
    instruction=INSTRUCTION,
    source=SOURCE,
    default_model="unsloth/Qwen2.5-VL-7B-Instruct",
    default_model_4bit="unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit",
    image_size=448,
    max_new_tokens=64,
)


# ----------------------------------------------------------------------------- a generated catalog
_COLOURS = {"Red": (200, 40, 40), "Blue": (40, 70, 200), "Beige": (215, 190, 150), "Black": (25, 25, 25),
            "Green": (40, 150, 70)}
_PRODUCTS = {  # category code -> (noun, base price, drawing)
    "BAGS": ("Leather Tote Bag", 1890.0, "bag"),
    "SHOES": ("Check Sneakers", 650.0, "shoe"),
    "SCARVES": ("Cashmere Scarf", 490.0, "scarf"),
    "COATS": ("Trench Coat", 2290.0, "coat"),
}


def _draw(kind: str, colour: tuple[int, int, int], size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(img)
    s = size
    jitter = lambda v: int(v * s + rng.uniform(-0.03, 0.03) * s)  # noqa: E731
    if kind == "bag":
        d.rectangle([jitter(0.2), jitter(0.35), jitter(0.8), jitter(0.85)], fill=colour)
        d.arc([jitter(0.35), jitter(0.15), jitter(0.65), jitter(0.55)], 180, 360, fill=colour, width=max(2, s // 20))
    elif kind == "shoe":
        d.polygon([(jitter(0.1), jitter(0.7)), (jitter(0.9), jitter(0.7)), (jitter(0.9), jitter(0.55)),
                   (jitter(0.5), jitter(0.45)), (jitter(0.3), jitter(0.3)), (jitter(0.1), jitter(0.35))], fill=colour)
        d.rectangle([jitter(0.1), jitter(0.7), jitter(0.9), jitter(0.78)], fill=(240, 240, 240), outline=(0, 0, 0))
    elif kind == "scarf":
        for i in range(5):
            y = 0.15 + 0.14 * i
            d.rectangle([jitter(0.3), jitter(y), jitter(0.7), jitter(y + 0.1)], fill=colour)
    else:  # coat
        d.polygon([(jitter(0.3), jitter(0.15)), (jitter(0.7), jitter(0.15)), (jitter(0.85), jitter(0.9)),
                   (jitter(0.15), jitter(0.9))], fill=colour)
        d.line([(s // 2, jitter(0.15)), (s // 2, jitter(0.9))], fill=(0, 0, 0), width=max(1, s // 40))
    return img


def write_demo_catalog(folder: str | Path, *, n: int = 40, size: int = 96, seed: int = 0,
                       with_split: bool = False) -> Path:
    """A small generated catalog (drawn products + catalog.csv: image,title,category,price[,split]); returns the csv.

    The category shows in the drawing's shape, the colour in its fill, and the price follows from both,
    so a model can learn every field from the image alone."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    codes, colours = sorted(_PRODUCTS), sorted(_COLOURS)
    for i in range(n):
        code = codes[i % len(codes)]
        colour = colours[(i // len(codes)) % len(colours)]
        noun, base, kind = _PRODUCTS[code]
        price = base + 100.0 * colours.index(colour)
        name = f"images/{i:03d}_{code.lower()}_{colour.lower()}.png"
        _draw(kind, _COLOURS[colour], size, rng).save(folder / name)
        row = {"image": name, "title": f"{colour} {noun}", "category": code, "price": f"{price:.2f}"}
        if with_split:
            row["split"] = "test" if i % 5 == 4 else "train"
        rows.append(row)
    path = folder / "catalog.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


if __name__ == "__main__":
    from ..cli import recipe_main

    recipe_main(RECIPE)
