"""Generated image sets of any size, for the scale benchmarks and tests (benchmarks/check_data_scale.py).

`write_scale_set(root, n_train, n_test)` writes `<class>/{Train,Test}/*.png` (the bone-break layout, so
`check-data --recipe bone_fracture` reads it): small grayscale images with smooth structure that differ
from one another, plus planted near-copies of training images among the test images. Every
`leak_every`-th test image is a training image with +-1 grey level of noise (a leak: MAD about 0.5/255);
the one after it is a training image with +-5 levels of noise (MAD about 2.7/255: block means equal, so
the index keeps it as a candidate, and only the exact comparison rejects it). Written once; `.complete`
marks a finished set and holds its manifest.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def _upsampling(size: int, grid: int = 4) -> np.ndarray:
    """[size, grid] linear interpolation weights from a grid x grid field to size x size."""
    pos = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, grid - 1)
    weights = np.zeros((size, grid))
    weights[np.arange(size), lo] += 1 - (pos - lo)
    weights[np.arange(size), hi] += pos - lo
    return weights


def scale_images(rng: np.random.Generator, count: int, size: int = 64) -> np.ndarray:
    """count uint8 [size, size] images: a random 4x4 field smoothly upsampled, a bright blob, fine noise."""
    if count > 1000:  # bounded temporary memory
        return np.concatenate([scale_images(rng, min(1000, count - s), size) for s in range(0, count, 1000)])
    up = _upsampling(size).astype(np.float32)
    fields = up @ rng.uniform(20, 200, (count, 4, 4)).astype(np.float32) @ up.T
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = (rng.uniform(0.2, 0.8, (2, count, 1, 1)) * size).astype(np.float32)
    width = (size * rng.uniform(0.05, 0.2, (count, 1, 1))).astype(np.float32)
    blob = 80 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
    pixels = fields + blob + 2 * rng.standard_normal((count, size, size), dtype=np.float32)
    return pixels.clip(0, 255).astype(np.uint8)


def write_scale_set(root: str | Path, n_train: int, n_test: int, *, seed: int = 0, leak_every: int = 100,
                    workers: int = 4, chunk: int = 1000) -> dict:
    """Write the set (once) and return its manifest {train, test, leaks: {test file: train file}}."""
    root = Path(root)
    done = root / ".complete"  # written last; holds the manifest (not a .json file: loaders would read that)
    if done.exists():
        return json.loads(done.read_text())

    def train_file(i: int) -> Path:
        return root / f"class{i % CLASSES}" / "Train" / f"tr{i:06d}.png"

    def write_train(start: int) -> None:
        images = scale_images(np.random.default_rng([seed, 0, start]), min(chunk, n_train - start))
        for i, pixels in enumerate(images, start):
            Image.fromarray(pixels).save(train_file(i), compress_level=1)

    leaks = {}

    def write_test(start: int) -> None:
        rng = np.random.default_rng([seed, 1, start])
        images = scale_images(rng, min(chunk, n_test - start))
        for k, pixels in enumerate(images, start):
            path = root / f"class{k % CLASSES}" / "Test" / f"te{k:06d}.png"
            if k % leak_every in (0, 1) and n_train:
                # Among the first 10(k+1) training images: a subset of the first N training and N/10 test
                # images (the benchmark's smaller sizes) holds its planted copies' sources too.
                source = train_file(int(rng.integers(min(n_train, 10 * (k + 1)))))
                base = np.asarray(Image.open(source), dtype=np.int16)
                if k % leak_every == 0:  # a re-encoded copy: +-1 grey level
                    pixels = base + rng.integers(-1, 2, base.shape)
                    leaks[str(path)] = str(source)
                else:  # a noisy copy: about 2.7 grey levels off on average, over the threshold
                    pixels = base + rng.integers(-5, 6, base.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, compress_level=1)

    for c in range(CLASSES):
        for split in ("Train", "Test"):
            (root / f"class{c}" / split).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write_train, range(0, n_train, chunk)))
        list(pool.map(write_test, range(0, n_test, chunk)))
    manifest = {"train": n_train, "test": n_test, "seed": seed, "leak_every": leak_every, "leaks": leaks}
    done.write_text(json.dumps(manifest, indent=0))
    return manifest


def write_scale_listing(root: str | Path, n_rows: int, *, n_files: int = 2000, n_test_rows: int = 20, seed: int = 0,
                        size: int = 64) -> Path:
    """A CSV listing (path,label,split) of n_rows training rows + n_test_rows test rows, written once.

    The training rows reuse `n_files` PNGs in turn (writing 100,000 files costs minutes; the rows, not
    the files, are what a large listing costs up front); every test row has a file of its own. Returns the
    listing's path; `.complete` marks a finished listing.
    """
    root = Path(root)
    listing = root / "listing.csv"
    if (root / ".complete").exists():
        return listing
    (root / "img").mkdir(parents=True, exist_ok=True)
    images = scale_images(np.random.default_rng([seed, 2]), n_files + n_test_rows, size)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(root / "img" / f"{i:06d}.png", compress_level=1)
    lines = ["path,label,split"]
    lines += [f"img/{i % n_files:06d}.png,class{i % n_files % CLASSES},train" for i in range(n_rows)]
    lines += [f"img/{n_files + k:06d}.png,class{k % CLASSES},test" for k in range(n_test_rows)]
    listing.write_text("\n".join(lines) + "\n")
    (root / ".complete").write_text(json.dumps({"rows": n_rows, "files": n_files, "test_rows": n_test_rows}))
    return listing
