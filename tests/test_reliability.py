"""Reliability at scale and under real faults: shared images, run-folder locks, leakage search at scale,
large listings, full disks. GPU faults (real out-of-memory, kill -9 with unsloth) are in test_gpu_faults.py."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _xray(path: Path, seed: int, size: int = 48) -> Path:
    """A small image with structure (a bright blob on a dark field), different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size * rng.uniform(0.08, 0.3)) ** 2))
    pixels = (rng.uniform(0.05, 0.4) + rng.uniform(0.3, 0.6) * blob) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L").save(path)
    return path


# ----------------------------------------------------------------------------- #14.8: shared images
def test_one_image_in_50_rows_is_prepared_once_with_8_threads(tmp_path):
    from unsloth_med.data.images import ImageFit
    from unsloth_med.data.prepare import _prepare_one, prepare_images

    image = _xray(tmp_path / "one.png", 0)
    fit = ImageFit(32, factor=16)
    rows = [{"image": str(image), "target": f"answer {i}", "id": str(i)} for i in range(50)]
    prepared, stats = prepare_images(rows, fit, tmp_path / "cache", workers=8)
    assert len(prepared) == 50 and len(set(prepared["image"])) == 1
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert [p.suffix for p in cached] == [".png"]  # one image, no temporary file left behind

    # The writers themselves: 8 threads writing the same cached image at once (the old pid-only temporary
    # name made them rename each other's file away: FileNotFoundError).
    fresh = tmp_path / "cache2"
    barrier, errors = threading.Barrier(8), []

    def write():
        try:
            for round_ in range(20):  # a fresh cache each round: all 8 threads write the same new file
                barrier.wait()
                _prepare_one(str(image), fit, fresh / str(round_))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not list(fresh.rglob("*.tmp"))
