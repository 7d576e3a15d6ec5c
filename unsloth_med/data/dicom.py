"""DICOM files as 8-bit pictures a VLM can read, the way a radiologist's viewer would show them.

`load_dicom(path)` is what `images.load_image` calls for every path ending in `.dcm`:

- grayscale (MONOCHROME1/2): the Modality LUT (RescaleSlope/Intercept, e.g. to Hounsfield units),
  then the VOI transform the file asks for: its VOI LUT Sequence if it has one, else its first
  Window Center/Width (LINEAR, LINEAR_EXACT or SIGMOID), else the image's own min..max. The result
  is mapped to 0..255, so 12/16/32-bit data never clips at 255 and is never left mostly black.
- MONOCHROME1 (bright = low values, common for CR/DX radiographs) is inverted, so bone is bright.
- colour (RGB, YBR_* decoded to RGB by pydicom, PALETTE COLOR through its palette): to 8-bit RGB.
- multi-frame (CT/MR stacks, cine): the first frame, with a logged note; or, with
  `multiframe="error"` (or UNSLOTH_MED_DICOM_MULTIFRAME=error), an ImageError.

Anything unusable (pydicom missing, not DICOM, no pixel data, a compressed transfer syntax with no
decoder installed, a truncated file) raises `ImageError` naming the file and the fix.
"""
from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ImageError
from .images import FileNotes

log = logging.getLogger(__name__)
multiframe_files = FileNotes(log)  # the multi-frame note: once, then counted

MULTIFRAME_ENV = "UNSLOTH_MED_DICOM_MULTIFRAME"
MULTIFRAME_CHOICES = ("first", "error")
DECODER_HINT = (
    "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle (JPEG, JPEG 2000, RLE), "
    "or pip install python-gdcm"
)


class _DropDecoderTracebacks(logging.Filter):
    """pydicom logs every failed decode with a full traceback, then raises; we turn the exception into one
    ImageError naming the file and the fix, so the duplicate log record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)


def _quiet_pydicom_decoders() -> None:
    logger = logging.getLogger("pydicom.pixels.decoders.base")
    if not any(isinstance(f, _DropDecoderTracebacks) for f in logger.filters):
        logger.addFilter(_DropDecoderTracebacks())


def multiframe_policy() -> str:
    """What a multi-frame file gives: its first frame ("first", the default) or an error
    (UNSLOTH_MED_DICOM_MULTIFRAME=error)."""
    return (os.environ.get(MULTIFRAME_ENV) or "first").lower()


def load_dicom(source: Any, *, multiframe: str | None = None) -> Image.Image:
    """A PIL image ("L" for grayscale, "RGB" for colour, 8 bits) from a DICOM file path, bytes or file object.
    Every failure is an ImageError naming the file, so that validation counts and skips it."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else f"<DICOM {type(source).__name__}>"
    try:
        return _load_dicom(source, name, (multiframe or multiframe_policy()).lower())
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds past the header too (a transfer syntax
        # that is no UID, a bad length in an element read on access): one error the run counts and skips
        raise ImageError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {str(exc)[:200]}). Re-export "
                         "it or remove it from the dataset.") from exc


def _load_dicom(source: Any, name: str, multiframe: str) -> Image.Image:
    if multiframe not in MULTIFRAME_CHOICES:
        raise ImageError(f"{name}: multi-frame policy '{multiframe}' is not one of {', '.join(MULTIFRAME_CHOICES)} "
                         f"(set {MULTIFRAME_ENV}=first or error).")
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise ImageError(f"{name}: reading DICOM (.dcm) files needs pydicom: pip install pydicom") from exc

    _quiet_pydicom_decoders()
    ds = _read(pydicom, InvalidDicomError, source, name)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = (getattr(ds.get("SOPClassUID"), "name", "")
                or getattr(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID"), "name", "") or "")
        if "Rows" in ds or "Columns" in ds or "Image Storage" in kind:
            # An image object (it has image rows/columns or an image SOP class) without its pixels: the file
            # was cut short before them (an interrupted copy or download), not a non-image object.
            raise ImageError(
                f"{name}: the file is truncated: it ends after {_size_of(source)}, before its pixel data "
                f"({kind or 'an image'}{_shape_of(ds)}). Copy or export it again, or remove it from the dataset."
            )
        raise ImageError(
            f"{name}: this DICOM file holds no image (no Pixel Data{'; it is a ' + kind if kind else ''}). "
            "Remove it from the dataset: only image objects can be used."
        )
    frames = _int(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        if multiframe == "error":
            raise ImageError(
                f"{name}: multi-frame DICOM ({frames} frames) is refused ({MULTIFRAME_ENV}=error). Export the frame "
                f"you want as its own file, or set {MULTIFRAME_ENV}=first to use the first frame."
            )
        _note_multiframe(name, frames)
    arr = _pixels(ds, name, first_frame_only=frames > 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            if arr.ndim != 2:
                raise ImageError(f"{name}: grayscale DICOM with pixel array of shape {arr.shape}; "
                                 "expected rows x columns.")
            gray = to_display_gray(arr, ds)
            return Image.fromarray(gray, "L")
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            rgb = apply_color_lut(arr, ds)
            return Image.fromarray(_to_uint8(rgb, bits=16 if rgb.dtype.itemsize > 1 else 8), "RGB")
        if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB, and YBR_* already converted to RGB by pydicom
            return Image.fromarray(_to_uint8(arr, bits=_int(ds.get("BitsStored"), 8)), "RGB")
    except ImageError:
        raise
    except Exception as exc:  # malformed LUTs, windows, palettes: name the file
        raise ImageError(f"{name}: cannot convert DICOM pixel data to an image ({type(exc).__name__}: {exc}).") from exc
    raise ImageError(
        f"{name}: DICOM photometric interpretation '{photometric}' with pixel array {arr.shape} is not supported. "
        "Convert the file to PNG, or to MONOCHROME2/RGB DICOM."
    )


# ----------------------------------------------------------------------------- reading
def _read(pydicom, InvalidDicomError, source: Any, name: str):
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: file not found. Check the data folder or the path column of your listing.")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: the file is empty (0 bytes). Remove it or copy it again.")
    try:
        try:
            return pydicom.dcmread(source)
        except InvalidDicomError:
            # No 128-byte preamble + "DICM": old ACR-NEMA style files are still often valid; try once more.
            if hasattr(source, "seek"):
                source.seek(0)
            ds = pydicom.dcmread(source, force=True)
            if "PixelData" not in ds:
                raise ImageError(f"{name}: not a DICOM image (no DICM header, and no pixel data found when read "
                                 "without one). Is it another format with a .dcm name, or a non-image DICOM object?")
            return ds
    except ImageError:
        raise
    except (EOFError, struct.error) as exc:  # the file ends inside a header element
        raise ImageError(f"{name}: the file is truncated: it ends after {_size_of(source)}, inside its header "
                         f"({type(exc).__name__}: {exc}). Copy or export it again, or remove it from the "
                         "dataset.") from exc
    # Any other kind pydicom raises on a corrupt header becomes load_dicom's one ImageError for the file.


def _size_of(source: Any) -> str:
    try:
        if isinstance(source, (str, os.PathLike)):
            return f"{Path(source).stat().st_size:,} bytes"
        if isinstance(source, (bytes, bytearray)):
            return f"{len(source):,} bytes"
    except OSError:
        pass
    return "too few bytes"


def _shape_of(ds) -> str:
    rows, columns = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    return f", {columns}x{rows} pixels" if rows and columns else ""


def _pixels(ds, name: str, *, first_frame_only: bool) -> np.ndarray:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if first_frame_only:
            ds.pixel_array_options(index=0)  # decode only the frame we use
        arr = ds.pixel_array
    except Exception as exc:
        compressed = bool(syntax is not None and getattr(syntax, "is_compressed", False))
        syntax_name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
        if compressed and isinstance(exc, (RuntimeError, NotImplementedError)):
            raise ImageError(
                f"{name}: its pixel data is compressed ({syntax_name}) and no installed decoder could read it "
                f"({type(exc).__name__}: {str(exc)[:160]}). Install a decoder: {DECODER_HINT}; if it still fails, "
                "the file is corrupt: re-export it or remove it from the dataset."
            ) from exc
        if "less than expected" in str(exc):  # pydicom: fewer pixel bytes than Rows x Columns x bits need
            raise ImageError(
                f"{name}: the file is truncated: its pixel data is cut short ({str(exc).split(' - ')[0]}). Copy or "
                "export it again, or remove it from the dataset."
            ) from exc
        raise ImageError(
            f"{name}: cannot decode its DICOM pixel data ({type(exc).__name__}: {str(exc)[:200]}); "
            "the file may be truncated or corrupt. Re-export it or remove it from the dataset."
        ) from exc
    arr = np.asarray(arr)
    per_frame_ndim = 3 if _int(ds.get("SamplesPerPixel"), 1) > 1 else 2
    if arr.ndim == per_frame_ndim + 1:  # a stack of frames came back: keep the first
        arr = arr[0]
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _note_multiframe(name: str, frames: int) -> None:
    multiframe_files.note(name, "%s: multi-frame DICOM (%d frames); using the first frame (set %s=error to refuse "
                          "these files)", frames, MULTIFRAME_ENV)


# ----------------------------------------------------------------------------- grayscale display pipeline
def to_display_gray(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> Modality LUT -> VOI LUT / window / min-max -> uint8, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds) if ("RescaleSlope" in ds or "ModalityLUTSequence" in ds) else arr
    values = np.asarray(values)
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        out = _apply_voi_lut_sequence(values, ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds and _window(ds) is not None:
        center, width = _window(ds)
        out = apply_window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    else:
        out = _min_max(values)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _window(ds) -> tuple[float, float] | None:
    """The first Window Center/Width pair (files may list several alternative views)."""
    def first(value):
        if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (str, bytes))):
            value = value[0] if len(value) else None
        return None if value in (None, "") else float(value)

    try:
        center, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError):
        return None
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None
    return center, width


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, to floats in 0..1."""
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    # LINEAR (the default): center - 0.5, width - 1, per the standard
    width = max(width - 1.0, 1e-6)
    return np.clip((x - (center - 0.5)) / width + 0.5, 0.0, 1.0)


def _apply_voi_lut_sequence(values: np.ndarray, ds) -> np.ndarray:
    """The file's first VOI LUT, scaled to 0..1 by the LUT's own output range (often narrower than its depth)."""
    from pydicom.pixels import apply_voi

    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first_mapped = int(descriptor[0]) or 2 ** 16, int(descriptor[1])
    table = apply_voi(np.arange(first_mapped, first_mapped + entries, dtype=np.int64), ds, 0).astype(np.float64)
    mapped = apply_voi(np.rint(values).astype(np.int64), ds, 0).astype(np.float64)
    lo, hi = float(table.min()), float(table.max())
    return np.zeros_like(mapped) if hi <= lo else (mapped - lo) / (hi - lo)


def _min_max(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)


def _to_uint8(arr: np.ndarray, *, bits: int) -> np.ndarray:
    """Colour channels of any depth to 0..255 (scaled by the stored bit depth, not by the image's range)."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    bits = bits if bits and bits > 0 else arr.dtype.itemsize * 8
    top = float(2 ** bits - 1)
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default
