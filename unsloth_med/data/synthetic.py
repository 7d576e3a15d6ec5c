"""Generated fracture-like X-rays for the offline demo and the tests (numpy + PIL only).

`write_synthetic_fractures(root)` writes the real Kaggle layout of the bone-break dataset,
`<root>/Bone Break Classification/Bone Break Classification/<class>/{Train,Test}/<name>.png`, so the
demo runs the same loading code as a real download. Each picture is one long bone (a bright shaft
with wider ends and brighter cortical edges, inside a faint soft-tissue shadow) on a dark noisy
background, with random position, angle (within 25 degrees of vertical), mirror, length, width,
brightness and noise. The break pattern depends on the class and is drawn large enough to survive
downscaling to 64 px:

| class | what it looks like |
|---|---|
| Avulsion fracture | intact shaft; a small chip torn off one corner of an end, pushed away from the bone |
| Comminuted fracture | a wide gap in the middle of the shaft filled with 5-8 small scattered fragments |
| Fracture Dislocation | transverse break; the lower part shifted sideways by most of a bone width |
| Greenstick fracture | the bone is bent (a kink of 14-24 degrees) with a crack on the convex side only |
| Hairline Fracture | intact, straight bone crossed by one thin, faint line |
| Impacted fracture | shortened bone; the pieces telescope into a very bright, wider overlap band |
| Longitudinal fracture | a dark line running along the shaft's long axis |
| Oblique fracture | one straight dark gap crossing the shaft at 35-55 degrees, pieces slightly shifted |
| Pathological fracture | a dark round lesion inside the shaft with a crack through it |
| Spiral Fracture | a dark S-shaped line winding down the shaft over a long stretch |

These are cartoons of the fracture types, meant only to give a tiny model something learnable
through the image; they say nothing about real radiographs.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .bone_break import CLASSES, LAYOUT

SUPERSAMPLE = 4  # draw at 4x and downscale: smooth edges and thin lines that stay visible



class _Canvas:
    """An 'L' drawing of the bone in its own frame: vertical, centred, coordinates in [0, 1]."""

    def __init__(self, n: int, tissue: int):
        self.n, self.tissue = n, tissue
        self.img = Image.new("L", (n, n), 0)
        self.draw = ImageDraw.Draw(self.img)

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (x * self.n, y * self.n)

    def poly(self, pts, value: int) -> None:
        self.draw.polygon([self.p(x, y) for x, y in pts], fill=int(value))

    def line(self, pts, width: float, value: int) -> None:
        self.draw.line([self.p(x, y) for x, y in pts], fill=int(value), width=max(1, int(round(width * self.n))),
                       joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, value: int) -> None:
        self.draw.ellipse([self.p(cx - rx, cy - ry), self.p(cx + rx, cy + ry)], fill=int(value))

    def gap(self, pts, width: float) -> None:
        """A fracture gap: the soft tissue shows through."""
        self.line(pts, width, self.tissue)


def _segment(c: _Canvas, x0: float, y0: float, x1: float, y1: float, w: float, bright: int,
             end0: bool = False, end1: bool = False) -> None:
    """A piece of shaft from (x0, y0) to (x1, y1), width w; `end*` adds the wider joint end there."""
    dx, dy = x1 - x0, y1 - y0
    length = math.hypot(dx, dy) or 1e-6
    nx, ny = -dy / length * w / 2, dx / length * w / 2
    c.poly([(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)], bright)
    # cortical edges brighter than the marrow
    edge = min(255, bright + 35)
    c.line([(x0 + nx * 0.8, y0 + ny * 0.8), (x1 + nx * 0.8, y1 + ny * 0.8)], w * 0.2, edge)
    c.line([(x0 - nx * 0.8, y0 - ny * 0.8), (x1 - nx * 0.8, y1 - ny * 0.8)], w * 0.2, edge)
    for flag, (x, y) in ((end0, (x0, y0)), (end1, (x1, y1))):
        if flag:
            c.ellipse(x, y, w * 0.95, w * 0.6, bright)


def _bone(c: _Canvas, top: float, bottom: float, w: float, bright: int) -> None:
    _segment(c, 0.5, top, 0.5, bottom, w, bright, end0=True, end1=True)


def draw_fracture(label: str, rng: np.random.Generator, size: int, *, pose_jitter: float = 1.0) -> Image.Image:
    """One synthetic X-ray (RGB, size x size) of the fracture class `label`.

    pose_jitter scales the random pose (mirror, rotation up to 25 degrees, shift, scale); 0 draws every
    bone upright and centred, which a tiny random-weight model learns far faster (see pipeline.DEMO_DATA).
    """
    classes = CLASSES
    if label not in classes:
        raise ValueError(f"Unknown fracture class {label!r}; expected one of: {', '.join(classes)}")
    n = size * SUPERSAMPLE
    background = float(rng.uniform(15, 45))
    tissue = int(rng.uniform(55, 85))
    bright = int(rng.uniform(165, 215))
    w = float(rng.uniform(0.12, 0.17))  # shaft width
    top, bottom = float(rng.uniform(0.08, 0.16)), float(rng.uniform(0.84, 0.92))
    yb = float(rng.uniform(0.42, 0.58))  # where the break is
    c = _Canvas(n, tissue)
    c.ellipse(0.5, 0.5, w * 2.2, 0.5, tissue)  # soft tissue

    if label == "Avulsion fracture":
        _bone(c, top, bottom, w, bright)
        end_y = top if rng.random() < 0.5 else bottom
        side = 1 if rng.random() < 0.5 else -1
        outward = -1 if end_y == top else 1
        cx, cy = 0.5 + side * w * 0.7, end_y
        r = w * 0.42
        c.ellipse(cx, cy, r, r, tissue)  # the notch the chip leaves
        push = w * float(rng.uniform(0.45, 0.65))
        c.ellipse(cx + side * push, cy + outward * push * 0.4, r * 0.8, r * 0.65, min(255, bright + 25))
    elif label == "Comminuted fracture":
        _bone(c, top, bottom, w, bright)
        h = float(rng.uniform(0.12, 0.17))
        c.poly([(0.5 - w, yb - h / 2), (0.5 + w, yb - h / 2), (0.5 + w, yb + h / 2), (0.5 - w, yb + h / 2)], tissue)
        for _ in range(int(rng.integers(5, 9))):
            fx = 0.5 + float(rng.uniform(-0.8, 0.8)) * w
            fy = yb + float(rng.uniform(-0.4, 0.4)) * h
            r = w * float(rng.uniform(0.2, 0.35))
            angles = np.sort(rng.uniform(0, 2 * math.pi, 5))
            c.poly([(fx + r * math.cos(a), fy + r * math.sin(a)) for a in angles], min(255, bright + 10))
    elif label == "Fracture Dislocation":
        shift = w * float(rng.uniform(0.8, 1.1)) * (1 if rng.random() < 0.5 else -1)
        tilt = float(rng.uniform(-0.04, 0.04))
        _segment(c, 0.5, top, 0.5, yb - 0.02, w, bright, end0=True)
        _segment(c, 0.5 + shift, yb + 0.02, 0.5 + shift + tilt, bottom, w, bright, end1=True)
    elif label == "Greenstick fracture":
        bend = math.radians(float(rng.uniform(14, 24))) * (1 if rng.random() < 0.5 else -1)
        lower = bottom - yb
        x1, y1 = 0.5 + math.sin(bend) * lower, yb + math.cos(bend) * lower
        _segment(c, 0.5, top, 0.5, yb, w, bright, end0=True)
        _segment(c, 0.5, yb, x1, y1, w, bright, end1=True)
        c.ellipse(0.5, yb, w / 2, w / 2, bright)
        convex = -1 if bend > 0 else 1  # the crack opens on the outside of the bend
        c.gap([(0.5 + convex * w * 0.6, yb), (0.5 + convex * w * 0.05, yb + 0.01)], 0.03)
    elif label == "Hairline Fracture":
        _bone(c, top, bottom, w, bright)
        slope = float(rng.uniform(-0.03, 0.03))
        faint = int(bright - (bright - tissue) * float(rng.uniform(0.45, 0.65)))
        c.line([(0.5 - w * 0.55, yb - slope), (0.5 + w * 0.55, yb + slope)], 0.02, faint)
    elif label == "Impacted fracture":
        short = float(rng.uniform(0.08, 0.12))
        top, bottom = top + short / 2, bottom - short / 2
        _segment(c, 0.5, top, 0.5, yb, w, bright, end0=True)
        _segment(c, 0.5, yb, 0.5, bottom, w * 0.85, bright, end1=True)
        band = float(rng.uniform(0.045, 0.065))
        c.poly([(0.5 - w * 0.62, yb - band / 2), (0.5 + w * 0.62, yb - band / 2),
                (0.5 + w * 0.62, yb + band / 2), (0.5 - w * 0.62, yb + band / 2)], 255)
    elif label == "Longitudinal fracture":
        _bone(c, top, bottom, w, bright)
        half = float(rng.uniform(0.2, 0.3))
        x = 0.5 + float(rng.uniform(-0.15, 0.15)) * w
        drift = float(rng.uniform(-0.2, 0.2)) * w
        c.gap([(x - drift, yb - half), (x, yb), (x + drift, yb + half)], 0.035)
    elif label == "Oblique fracture":
        _bone(c, top, bottom, w, bright)
        angle = math.radians(float(rng.uniform(35, 55))) * (1 if rng.random() < 0.5 else -1)
        dy = math.tan(angle) * w * 0.7
        c.gap([(0.5 - w * 0.7, yb - dy), (0.5 + w * 0.7, yb + dy)], 0.045)
    elif label == "Pathological fracture":
        _bone(c, top, bottom, w, bright)
        r = w * float(rng.uniform(0.42, 0.5))
        dark = int(tissue + (bright - tissue) * 0.15)
        c.ellipse(0.5 + float(rng.uniform(-0.1, 0.1)) * w, yb, r, r * float(rng.uniform(1.1, 1.6)), dark)
        c.gap([(0.5 - w * 0.6, yb + 0.01), (0.5 + w * 0.6, yb - 0.01)], 0.014)
    elif label == "Spiral Fracture":
        _bone(c, top, bottom, w, bright)
        half = float(rng.uniform(0.16, 0.22))
        phase = float(rng.uniform(0, 0.5)) + (0 if rng.random() < 0.5 else math.pi)
        pts = [(0.5 + 0.42 * w * math.sin(phase + 2 * math.pi * 0.75 * t), yb - half + 2 * half * t)
               for t in np.linspace(0, 1, 24)]
        c.gap(pts, 0.035)

    layer = c.img
    # pose: mirror, rotate, shift, scale
    if rng.random() < 0.5 and pose_jitter > 0:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-25, 25)) * pose_jitter
    shift = rng.uniform(-0.07, 0.07, 2) * n * pose_jitter
    scale = 1.0 + (float(rng.uniform(0.88, 1.05)) - 1.0) * pose_jitter
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(float(shift[0]), float(shift[1])))
    if scale != 1.0:
        m = int(round(n * scale))
        scaled = layer.resize((m, m), Image.Resampling.BILINEAR)
        layer = Image.new("L", (n, n), 0)
        layer.paste(scaled, ((n - m) // 2, (n - m) // 2))
    layer = layer.filter(ImageFilter.GaussianBlur(radius=SUPERSAMPLE * float(rng.uniform(0.3, 0.6))))
    small = np.asarray(layer.resize((size, size), Image.Resampling.BOX), dtype=np.float32)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    vignette = 1.0 - 0.35 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    out = np.maximum(small, background) * vignette
    out = out * float(rng.uniform(0.85, 1.15)) + rng.normal(0, float(rng.uniform(4, 9)), (size, size))
    out = np.clip(out, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L").convert("RGB")


def write_synthetic_fractures(root: str | Path, *, train_per_class: int = 120, test_per_class: int = 12,
                              size: int = 64, seed: int = 0, pose_jitter: float = 1.0) -> Path:
    """Writes the Kaggle layout under root; returns root. Deterministic for a seed."""
    root = Path(root)
    class_root = root.joinpath(*LAYOUT)
    for k, label in enumerate(CLASSES):  # the dataset's classes: the recipe trains on these unchanged
        for split, count, offset in (("Train", train_per_class, 0), ("Test", test_per_class, 1)):
            folder = class_root / label / split
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, k, offset])
            stem = label.lower().replace(" ", "_")
            for i in range(count):
                draw_fracture(label, rng, size, pose_jitter=pose_jitter).save(
                    folder / f"{stem}_{split.lower()}_{i:04d}.png", optimize=False)
    return root


def write_fracture_vqa(fracture_root: str | Path, listing: str | Path, *, seed: int = 0,
                       classes: tuple[str, ...] | None = None, train_images_per_class: int | None = None,
                       test_images_per_class: int | None = None) -> Path:
    """A VQA listing (image, question, answer, answer_type, split) over generated fracture X-rays.

    Each image gets three questions whose answers need both the question and the image: "What kind of
    fracture is this?" (open: the class), "Is this a <its class>?" (yes) and "Is this a <another class>?"
    (no), so yes and no are equally frequent and every class name is asked as often with yes as with no.
    `classes` picks the fracture types (default: all); the first `*_images_per_class` images of each
    class and split are used (default: all). Rows are written question by question (all first
    questions, then all second ...), so rows of one image are far apart in the file."""
    import csv
    import random

    rng = random.Random(seed)
    class_root = Path(fracture_root).joinpath(*LAYOUT)
    classes = tuple(classes or CLASSES)
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown or len(classes) < 2:
        raise ValueError(f"write_fracture_vqa needs two or more of {', '.join(CLASSES)}; got {', '.join(classes)}")
    limit = {"Train": train_images_per_class, "Test": test_images_per_class}
    images = [(path, label, split) for label in classes for split in ("Train", "Test")
              for path in sorted((class_root / label / split).glob("*.png"))[:limit[split]]]
    rows: list[list[dict]] = [[], [], []]
    for path, label, split in images:
        other = rng.choice([c for c in classes if c != label])
        common = {"image": str(path), "split": split.lower()}
        rows[0].append({**common, "question": "What kind of fracture is this?", "answer": label, "answer_type": "open"})
        asks = [(label, "yes"), (other, "no")]
        rng.shuffle(asks)  # the yes question is not always the second one
        for k, (asked, answer) in enumerate(asks, 1):
            rows[k].append({**common, "question": f"Is this a {asked}?", "answer": answer, "answer_type": "closed"})
    listing = Path(listing)
    listing.parent.mkdir(parents=True, exist_ok=True)
    with listing.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "question", "answer", "answer_type", "split"])
        writer.writeheader()
        for block in rows:
            writer.writerows(block)
    return listing
