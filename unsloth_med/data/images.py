"""Decode one image safely and hand the model an RGB picture of a bounded size.

Medical images arrive in every mode there is: 16-bit grayscale, CMYK scans, palette PNGs with
transparency, phone photos with an EXIF rotation. All become 8-bit RGB here, oriented as a person
would see them, and never larger than `max_side` on their longest side: image size is what drives
the number of image tokens, and so the model's memory use.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

# Refuse decompression bombs: more pixels than this is no X-ray we can use (a 12k x 12k scan is 144 MP).
MAX_PIXELS = 160_000_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: stretch the used range to 0..255 instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        img = Image.fromarray(scaled.astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become black, the background of a radiograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(source: Any, max_side: int | None = None) -> Image.Image:
    """An RGB PIL image from a path, bytes, a dict {'bytes'|'path'} (HF datasets) or a PIL image.

    Raises ImageError naming the file for anything that is not a usable image.
    """
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".dcm"):
        from .dicom import load_dicom  # optional dependency, only for DICOM files

        img = load_dicom(source)
    else:
        img = _open(source, name)
    try:
        _check_size(img, name)
        img.load()  # force decoding now so truncated files fail here, not inside the trainer
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc}). Re-export the file or remove it from the dataset.") from exc
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img


def _open(source: Any, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # datasets' Image feature, undecoded
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: file not found. Check the data folder or the path column of your listing.")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: the file is empty (0 bytes). Remove it or copy it again.")
    try:
        with Image.open(source) as handle:
            _check_size(handle, name)
            handle.load()
            return handle.copy() if handle.format != "MPO" else handle.convert(handle.mode)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc}). Remove it from the dataset.") from exc


def _check_size(img: Image.Image, name: str) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise ImageError(
            f"{name}: {img.width}x{img.height} pixels is over the limit of {MAX_PIXELS:,} "
            "(a decompression bomb or an unusually large scan). Downscale it or remove it from the dataset."
        )


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return f"<{type(source).__name__} image>"


def raw_image_column(dataset) -> list:
    """The `image` column without letting `datasets` decode it (paths stay paths, images stay bytes), so
    decoding, and its errors, happen in `load_image`. Works on a datasets.Dataset or a list of rows."""
    features = getattr(dataset, "features", None)
    if features is not None:
        from datasets import Image as ImageFeature

        if isinstance(features.get("image"), ImageFeature):
            return list(dataset.cast_column("image", ImageFeature(decode=False))["image"])
        return list(dataset["image"])
    return [row["image"] for row in dataset]
