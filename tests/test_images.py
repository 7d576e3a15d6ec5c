"""Bad and odd images: converted, or refused with the project's own error naming the file."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from unsloth_med.data import images as images_mod
from unsloth_med.data.images import load_image
from unsloth_med.data.validate import validate_split
from unsloth_med.errors import DataError, ImageError


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_sixteen_bit_grayscale_is_stretched_not_clipped(tmp_path):
    arr = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit range in 16-bit PNG
    path = _save(Image.fromarray(arr), tmp_path / "ct.png")
    img = load_image(path)
    assert img.mode == "RGB"
    px = np.asarray(img)[..., 0]
    assert px.min() == 0 and px.max() == 255  # the used range fills 8 bits


def test_a_float_image_with_nan_or_inf_pixels_is_stretched_over_its_finite_ones(tmp_path):
    arr = np.linspace(-1.0, 3.0, 64 * 32, dtype=np.float32).reshape(64, 32)
    arr[0, 0], arr[5, 5] = np.nan, np.inf  # one bad pixel made the whole image black
    px = np.asarray(load_image(_save(Image.fromarray(arr, "F"), tmp_path / "map.tif")))[..., 0]
    assert px.max() == 255 and px[-1, -1] == 255 and px[1, 0] < 5 and px[0, 0] == 0 and px[5, 5] == 0


def test_cmyk_palette_alpha_and_grayscale_become_rgb(tmp_path):
    cmyk = _save(Image.new("CMYK", (40, 30), (0, 0, 0, 0)), tmp_path / "scan.jpg")
    palette = Image.new("P", (20, 20))
    palette.info["transparency"] = 0
    pal = _save(palette, tmp_path / "pal.png", transparency=0)
    rgba = _save(Image.new("RGBA", (10, 10), (255, 255, 255, 0)), tmp_path / "alpha.png")
    gray = _save(Image.new("L", (12, 8), 90), tmp_path / "gray.png")
    for path in (cmyk, pal, rgba, gray):
        img = load_image(path)
        assert img.mode == "RGB", path
    assert np.asarray(load_image(rgba)).max() == 0  # transparent -> black background


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 60)


def test_resize_keeps_aspect_and_bounds_longest_side(tmp_path):
    path = _save(Image.new("RGB", (1000, 500)), tmp_path / "wide.png")
    assert load_image(path, 256).size == (256, 128)
    assert load_image(path, 2000).size == (1000, 500)  # never upscaled


@pytest.mark.parametrize("case", ["truncated", "zero_bytes", "not_an_image", "missing"])
def test_unusable_files_raise_image_error_naming_the_file(tmp_path, case):
    path = tmp_path / f"{case}.jpg"
    if case == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "not_an_image":
        path.write_text("patient notes, not a picture")
    with pytest.raises(ImageError, match=str(path.name)):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "LARGE_MAX_PIXELS", 100 * 100)
    path = _save(Image.new("L", (101, 100)), tmp_path / "bomb.png")
    with pytest.raises(ImageError, match=r"bomb.png: 101x100 pixels is over the limit"):
        load_image(path)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGB", "JPEG"), ("P", "PNG"), ("I;16", "PNG"), ("RGBA", "TIFF")])
def test_very_large_images_decode_downscaled_with_a_note_once(tmp_path, monkeypatch, caplog, mode, fmt):
    """Over MAX_PIXELS (scaled down here): decoded with the longest side at most LARGE_IMAGE_SIDE, noted once per
    file however often it is loaded, instead of refused."""
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 300 * 200 - 1)
    monkeypatch.setattr(images_mod, "LARGE_IMAGE_SIDE", 64)
    monkeypatch.setattr(images_mod, "large_images", images_mod.FileNotes(images_mod.log))
    arr = (np.arange(200 * 300).reshape(200, 300) % 251).astype(np.uint16 if mode == "I;16" else np.uint8)
    img = Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(arr)
    path = _save(img, tmp_path / f"big.{fmt.lower()}", format=fmt)
    with caplog.at_level(logging.DEBUG, logger="unsloth_med.data.images"):
        loaded = [load_image(path) for _ in range(3)]
    assert all(im.mode == "RGB" and max(im.size) <= 64 and im.size[0] > im.size[1] for im in loaded)
    notes = [r for r in caplog.records if "decoded downscaled" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING and "300x200" in notes[0].getMessage()
    assert images_mod.large_images.count == 1


def test_pils_own_bomb_warning_never_reaches_the_screen(tmp_path, recwarn):
    """Between PIL's limit (89 MP) and ours, PIL warns with its own DecompressionBombWarning text; the
    package checks sizes itself, so that text is never shown. The limit is PIL's again afterwards."""
    path = _save(Image.new("L", (9500, 9500)), tmp_path / "scan.png", compress_level=1)  # 90 MP
    before = Image.MAX_IMAGE_PIXELS
    assert load_image(path, 64).size == (64, 64)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == before


def test_a_14000_pixel_png_decodes_downscaled_in_bounded_memory(tmp_path):
    """The real case: a valid 14000x14000 grayscale PNG (196 MP, over PIL's and the package's full-size limits) is
    decoded downscaled, in a fresh process whose peak memory stays within the one full-size buffer of the file's
    own mode plus a margin: no full-size RGB conversion (another 588 MB) happens."""
    side = 14000
    big = Image.new("L", (side, side), 0)
    big.paste(255, (side // 4, side // 4, side // 2, side // 2))
    path = _save(big, tmp_path / "huge.png", compress_level=1)
    del big
    script = (
        "import logging, resource, sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from unsloth_med.data.images import load_image\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"img = load_image({str(path)!r}, 512)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(img.size, img.getpixel((200, 200)), img.getpixel((10, 10)), (peak - base) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    grown_mb = int(result.stdout.split()[-1])
    assert result.stdout.startswith("(512, 512) (255, 255, 255) (0, 0, 0)"), result.stdout
    assert "14000x14000 pixels (196 MP)" in result.stderr and "decoded downscaled, to 3500x3500" in result.stderr
    assert "DecompressionBomb" not in result.stderr
    assert grown_mb < side * side * 1.4 / 2**20, f"peak grew by {grown_mb} MB"  # one 187 MB buffer, not 4


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), w=st.integers(1, 300), h=st.integers(1, 300),
       fmt=st.sampled_from(["PNG", "TIFF", "JPEG", "BMP", "WEBP"]), cut=st.one_of(st.none(), st.floats(0.0, 0.99)),
       flip=st.one_of(st.none(), st.integers(0, 10_000)), max_side=st.sampled_from([None, 64, 512]),
       seed=st.integers(0, 2**16))
def test_loader_returns_bounded_rgb_or_raises_its_own_error(tmp_path, mode, w, h, fmt, cut, flip, max_side, seed):
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    try:
        img = (base.convert(mode) if mode not in ("I;16",)
               else Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)))
        buf = io.BytesIO()
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot hold this mode: nothing to test
    data = bytearray(buf.getvalue())
    if cut is not None:
        data = data[: int(len(data) * cut)]
    if flip is not None and data:
        data[flip % len(data)] ^= 0xFF
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(bytes(data))
    try:
        out = load_image(path, max_side)
    except ImageError:
        return
    assert out.mode == "RGB"
    assert max_side is None or max(out.size) <= max_side


def test_validation_skips_and_lists_a_few_bad_files(tmp_path):
    rows = []
    for i in range(40):
        path = tmp_path / f"img{i}.png"
        if i == 7:
            path.write_bytes(b"")
        else:
            Image.new("RGB", (16, 16), (i, i, i)).save(path)
        rows.append({"image": str(path), "target": "a", "id": f"img{i}"})
    clean, skipped = validate_split(datasets.Dataset.from_list(rows), "train", image_size=64, max_bad_fraction=0.05)
    assert len(clean) == 39 and [s["id"] for s in skipped] == ["img7"]
    assert "empty" in skipped[0]["reason"]


def test_validation_stops_above_the_threshold(tmp_path):
    rows = []
    for i in range(10):
        path = tmp_path / f"img{i}.png"
        path.write_text("junk") if i < 2 else Image.new("RGB", (8, 8)).save(path)
        rows.append({"image": str(path), "target": "a", "id": f"img{i}"})
    with pytest.raises(DataError, match=r"(?s)2 of 10 train images \(20.0%\) cannot be used.*img0.*--max_bad_fraction"):
        validate_split(datasets.Dataset.from_list(rows), "train", image_size=64, max_bad_fraction=0.05)
