"""A small generated product catalog: drawn products and catalog.csv (image,title,category,price[,split]).

The product_catalog recipe's offline data (its tests, and trying the recipe without the Hub):

    python -c "from unsloth_med.data.synthetic_catalog import write_demo_catalog as w; print(w('data/catalog'))"

The category shows in the drawing's shape, the colour in its fill, and the price follows from both, so a model can
learn every field from the image alone.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

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
