"""DICOM input: pydicom's bundled test files through load_dicom / load_image and into a training batch."""
from __future__ import annotations

import logging
import sys
import warnings

import numpy as np
import pytest
from conftest import require

pydicom = require("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from unsloth_med.data import dicom as dicom_mod  # noqa: E402
from unsloth_med.data.dicom import apply_window, load_dicom  # noqa: E402
from unsloth_med.data.images import FileNotes, load_image  # noqa: E402
from unsloth_med.errors import ImageError  # noqa: E402

warnings.filterwarnings("ignore", module="pydicom")


def _file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return str(path)


def _variant(tmp_path, name: str, out: str, **changes) -> str:
    """A copy of a bundled file with some attributes changed (or deleted when the value is None)."""
    ds = pydicom.dcmread(_file(name))
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    path = tmp_path / out
    ds.save_as(path)
    return str(path)


# ----------------------------------------------------------------------------- grayscale display pipeline
def test_ct_16bit_is_rescaled_and_stretched_to_8bit_not_clipped():
    path = _file("CT_small.dcm")  # int16, RescaleSlope/Intercept, no window
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = load_dicom(path)
    px = np.asarray(img)
    assert img.mode == "L" and px.dtype == np.uint8 and img.size == (ds.Columns, ds.Rows)
    assert px.min() == 0 and px.max() == 255  # the used range fills 8 bits
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    assert np.abs(px.astype(int) - expected).max() <= 1
    assert len(np.unique(px)) > 100  # not collapsed to a few levels


def test_mr_window_center_width_matches_pydicom_windowing():
    from pydicom.pixels import apply_windowing

    path = _file("MR_small.dcm")  # WindowCenter 600 / WindowWidth 1600, signed 16-bit
    ds = pydicom.dcmread(path)
    reference = apply_windowing(ds.pixel_array, ds)  # pydicom's output range is the signed 16-bit range
    lo, hi = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
    expected = np.rint((reference - lo) / (hi - lo) * 255)
    px = np.asarray(load_dicom(path)).astype(int)
    assert np.abs(px - expected).max() <= 1
    # The window is really used: min-max stretching would give a different picture.
    raw = ds.pixel_array.astype(np.float64)
    minmax = np.rint((raw - raw.min()) / (raw.max() - raw.min()) * 255)
    assert np.abs(px - minmax).max() > 20


def test_window_functions_follow_the_standard():
    x = np.array([50.0, 99.5, 100.0, 200.0, 0.0])
    linear = apply_window(x, 100, 101)  # c-0.5 = 99.5, w-1 = 100: 99.5 -> 0.5, 50 -> 0.005
    assert linear[1] == pytest.approx(0.5) and linear[0] == pytest.approx(0.005)
    assert linear[3] == 1.0 and linear[4] == 0.0  # outside the window: clipped
    exact = apply_window(x, 100, 100, "LINEAR_EXACT")
    assert exact[2] == pytest.approx(0.5) and exact[4] == 0.0
    sigmoid = apply_window(x, 100, 50, "SIGMOID")
    assert sigmoid[2] == pytest.approx(0.5) and 0 < sigmoid[4] < 0.01 and sigmoid[3] > 0.99


def test_voi_lut_sequence_is_preferred_over_the_window(tmp_path):
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    item = Dataset()
    entries, first = 4096, 0
    item.add_new(0x00283002, "US", [entries, first, 16])  # LUT Descriptor
    lut = np.zeros(entries, dtype=np.uint16)
    lut[1000:] = 4000  # a hard threshold at stored value 1000
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    path = tmp_path / "voilut.dcm"
    ds.save_as(path)
    px = np.asarray(load_dicom(str(path)))
    raw = ds.pixel_array
    assert set(np.unique(px)) <= {0, 255}
    assert (px[raw >= 1000] == 255).all() and (px[raw < 1000] == 0).all()


def test_monochrome1_is_inverted(tmp_path):
    mono2 = np.asarray(load_dicom(_file("MR_small.dcm"))).astype(int)
    path = _variant(tmp_path, "MR_small.dcm", "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    mono1 = np.asarray(load_dicom(path)).astype(int)
    assert (mono1 == 255 - mono2).all()
    # Without a window too (min-max path).
    nowin = _variant(tmp_path, "MR_small.dcm", "mono1_nowin.dcm", PhotometricInterpretation="MONOCHROME1",
                     WindowCenter=None, WindowWidth=None)
    px = np.asarray(load_dicom(nowin)).astype(int)
    raw = pydicom.dcmread(nowin).pixel_array
    assert px[raw == raw.max()].max() == 0 and px[raw == raw.min()].min() == 255  # bright = low values


def test_colour_files_become_rgb():
    for name in ("SC_rgb_rle_16bit.dcm", "SC_ybr_full_422_uncompressed.dcm", "examples_palette.dcm",
                 "ExplVR_BigEnd.dcm"):
        img = load_dicom(_file(name))
        assert img.mode == "RGB", name
    sixteen = np.asarray(load_dicom(_file("SC_rgb_rle_16bit.dcm")))
    eight = np.asarray(load_dicom(_file("SC_rgb_rle.dcm")))
    assert np.abs(sixteen.astype(int) - eight.astype(int)).max() <= 1  # same picture stored at 16 bits


# ----------------------------------------------------------------------------- multi-frame
def test_multiframe_uses_the_first_frame_with_a_logged_note(caplog, monkeypatch):
    monkeypatch.delenv(dicom_mod.MULTIFRAME_ENV, raising=False)
    monkeypatch.setattr(dicom_mod, "multiframe_files", FileNotes(dicom_mod.log))
    path = _file("examples_ybr_color.dcm")  # 30 frames, YBR_FULL_422
    with caplog.at_level(logging.INFO, logger="unsloth_med.data.dicom"):
        img = load_dicom(path)
    frames = pydicom.dcmread(path).pixel_array  # all frames, converted to RGB
    assert frames.shape[0] == 30 and img.mode == "RGB"
    assert (np.asarray(img) == frames[0]).all()
    assert any("30 frames" in r.message and "first frame" in r.message for r in caplog.records)
    gray = load_dicom(_file("rtdose.dcm"))  # 15 frames, 32-bit grayscale
    assert gray.mode == "L" and gray.size == (10, 10)


def test_the_multiframe_note_is_said_once_then_counted(caplog, monkeypatch):
    """Validation, preparation and evaluation each decode a file: the note is one warning, not one per call,
    and later multi-frame files are counted in debug lines."""
    monkeypatch.delenv(dicom_mod.MULTIFRAME_ENV, raising=False)
    monkeypatch.setattr(dicom_mod, "multiframe_files", FileNotes(dicom_mod.log))
    with caplog.at_level(logging.DEBUG, logger="unsloth_med.data.dicom"):
        for _ in range(3):
            load_image(_file("examples_ybr_color.dcm"))
            load_image(_file("rtdose.dcm"))
    notes = [r for r in caplog.records if "multi-frame DICOM" in r.getMessage()]
    assert [r.levelno for r in notes] == [logging.WARNING, logging.DEBUG]
    assert "examples_ybr_color.dcm" in notes[0].getMessage() and "counted" in notes[0].getMessage()
    assert "(file 2 like this)" in notes[1].getMessage()
    assert dicom_mod.multiframe_files.count == 2


def test_multiframe_can_be_refused(monkeypatch):
    with pytest.raises(ImageError, match="multi-frame DICOM \\(30 frames\\)"):
        load_dicom(_file("examples_ybr_color.dcm"), multiframe="error")
    monkeypatch.setenv(dicom_mod.MULTIFRAME_ENV, "error")
    with pytest.raises(ImageError, match="refused"):
        load_image(_file("rtdose.dcm"))


# ----------------------------------------------------------------------------- unusable files
@pytest.mark.parametrize("name, message", [
    ("MR_truncated.dcm", "the file is truncated: its pixel data is cut short"),
    ("JPEG-lossy.dcm", "pip install pylibjpeg"),  # 12-bit JPEG: no decoder installed here
    ("test-SR.dcm", "holds no image"),
    ("rtplan.dcm", "holds no image"),
])
def test_unusable_dicom_raises_image_error_naming_the_file(name, message):
    path = _file(name)
    if name == "JPEG-lossy.dcm":
        try:
            pydicom.dcmread(path).pixel_array
            pytest.skip("a JPEG decoder plugin is installed here")
        except Exception:
            pass
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert name in str(info.value)


def test_a_truncated_dicom_is_called_truncated_wherever_it_was_cut(tmp_path):
    """Cut before the pixel data (it was reported as "no Pixel Data", as if it were no image object), inside a
    header element, or inside the pixel data: each says the file is truncated, with its size, and the fix."""
    data = open(_file("CT_small.dcm"), "rb").read()
    pixel_tag = data.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, little endian
    cases = {800: "ends after 800 bytes, before its pixel data (CT Image Storage)",
             pixel_tag: f"ends after {pixel_tag:,} bytes, before its pixel data (CT Image Storage, 128x128 pixels)",
             pixel_tag + 10: f"ends after {pixel_tag + 10:,} bytes, inside its header",
             pixel_tag + 5000: "its pixel data is cut short"}
    for cut, message in cases.items():
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageError) as info:
            load_image(path)
        text = str(info.value)
        assert text.startswith(f"{path}: the file is truncated") and message in text and "again" in text, text
        assert "no Pixel Data" not in text


def test_corrupt_headers_past_the_preamble_are_image_errors_that_validation_counts(tmp_path, monkeypatch):
    """A transfer syntax that is no UID, and files cut or damaged anywhere: each is one ImageError naming the file
    (a ValueError from pydicom stopped the run instead of being skipped); validation counts them; and a multi-frame
    file is refused under the error policy even after a run under the default policy checked it as usable."""
    import datasets

    from unsloth_med.data.validate import validate_split

    good = _file("CT_small.dcm")
    data = open(good, "rb").read()
    bad_syntax = tmp_path / "bad_syntax.dcm"
    bad_syntax.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.7\x00", 1))
    assert data != bad_syntax.read_bytes()
    rng = np.random.default_rng(0)
    damaged = []
    for k in range(12):  # bytes flipped past the preamble: whatever pydicom raises, one ImageError
        flipped = bytearray(data)
        for at in rng.integers(132, len(data), 8):
            flipped[at] ^= 0xFF
        path = tmp_path / f"flipped{k}.dcm"
        path.write_bytes(bytes(flipped))
        damaged.append(path)
    with pytest.raises(ImageError, match="bad_syntax.dcm"):
        load_image(bad_syntax)
    for path in damaged:
        try:
            load_image(path)
        except ImageError as error:
            assert path.name in str(error)
    rows = [{"image": str(p), "target": "a", "id": p.name} for p in (bad_syntax, *damaged)]
    rows.append({"image": good, "target": "a", "id": "good"})
    _, skipped = validate_split(datasets.Dataset.from_list(rows), "train", image_size=64, max_bad_fraction=1.0)
    assert "bad_syntax.dcm" in {s["id"] for s in skipped}

    multi = [{"image": _file("rtdose.dcm"), "target": "a", "id": "multi"}, {"image": good, "target": "a", "id": "one"}]
    kept, skipped = validate_split(datasets.Dataset.from_list(multi), "train", image_size=64, max_bad_fraction=1.0)
    assert len(kept) == 2 and not skipped  # the default policy: its first frame
    monkeypatch.setenv(dicom_mod.MULTIFRAME_ENV, "error")
    kept, skipped = validate_split(datasets.Dataset.from_list(multi), "train", image_size=64, max_bad_fraction=1.0)
    assert len(kept) == 1 and [s["id"] for s in skipped] == ["multi"]  # not the remembered verdict of the default


def test_not_dicom_empty_and_missing_files(tmp_path):
    fake = tmp_path / "fake.dcm"
    fake.write_text("this is not a DICOM file at all")
    with pytest.raises(ImageError, match="fake.dcm: not a DICOM image"):
        load_image(fake)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.dcm")


def test_missing_pydicom_is_a_clear_image_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(ImageError, match="pip install pydicom"):
        load_image(_file("CT_small.dcm"))


def test_bad_multiframe_policy_is_named(monkeypatch):
    monkeypatch.setenv(dicom_mod.MULTIFRAME_ENV, "middle")
    with pytest.raises(ImageError, match="first, error"):
        load_dicom(_file("CT_small.dcm"))


# ----------------------------------------------------------------------------- into training
@pytest.fixture()
def dicom_rows(tmp_path):
    mono1 = _variant(tmp_path, "MR_small.dcm", "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    files = [_file("CT_small.dcm"), _file("MR_small.dcm"), mono1, _file("examples_ybr_color.dcm"), _file("rtdose.dcm")]
    labels = ["Avulsion fracture", "Spiral Fracture", "Oblique fracture", "Hairline Fracture", "Greenstick fracture"]
    return [{"image": f, "target": t, "id": f"dcm{i}"} for i, (f, t) in enumerate(zip(files, labels))]


def test_load_image_gives_bounded_rgb_for_dicom(dicom_rows):
    for row in dicom_rows:
        img = load_image(row["image"], 48)
        assert img.mode == "RGB" and max(img.size) <= 48, row["image"]


def test_dicom_files_pass_validation_and_reach_a_training_batch(tiny_path, dicom_rows):
    import datasets

    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import ModelArgs
    from unsloth_med.data.validate import validate_split
    from unsloth_med.recipes.bone_fracture import RECIPE

    checked, skipped = validate_split(datasets.Dataset.from_list(dicom_rows), "train", image_size=64,
                                      max_bad_fraction=0.0)
    assert skipped == [] and len(checked) == len(dicom_rows)
    backend = HFBackend()
    model, processor = backend.load(str(tiny_path("mistral3")), ModelArgs())
    batch = backend.collator(model, processor, RECIPE, image_size=64, max_seq_length=4096)(list(checked))
    assert batch["input_ids"].shape[0] == len(dicom_rows)
    assert batch["pixel_values"].shape[0] == len(dicom_rows)
    assert (batch["labels"] != -100).any(dim=1).all()  # every row has its answer tokens labelled
    model.train()
    loss = model(**batch).loss
    assert loss.isfinite()
    loss.backward()
