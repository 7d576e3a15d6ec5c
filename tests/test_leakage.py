"""Train/test leakage: near-identical copies of training images among the test images."""
from __future__ import annotations

import glob
import io
import time

import numpy as np
import pytest
from PIL import Image

from unsloth_med.data.checks import check_data, drop_leaked, find_leaked_test_images, leaked_test_images
from unsloth_med.recipes import get_recipe

THRESHOLD = 2 / 255


def _gray64(path) -> np.ndarray:
    """Independent reference thumbnail: PIL straight from the file, no package code."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def real_leaks(bone_break_dir):
    root = bone_break_dir / "Bone Break Classification" / "Bone Break Classification"
    train = sorted(glob.glob(str(root / "*" / "Train" / "*.jpg")))
    test = sorted(glob.glob(str(root / "*" / "Test" / "*.jpg")))
    assert len(train) == 989 and len(test) == 140
    start = time.perf_counter()
    leaks = find_leaked_test_images(train, test)
    return leaks, time.perf_counter() - start, train, test


def test_real_bone_break_data_has_at_least_12_leaked_test_images(real_leaks):
    leaks, seconds, train, test = real_leaks
    print(f"\nleaked test images: {len(leaks)} of {len(test)} ({seconds:.1f} s)")
    assert len(leaks) >= 12
    assert seconds < 20
    assert len({e["test"] for e in leaks}) == len(leaks)  # one entry per test image
    train_set, test_set = set(train), set(test)
    for entry in leaks:
        assert entry["test"] in test_set and entry["train"] in train_set
        assert entry["mad"] < THRESHOLD
        # No false pair: recomputed independently, the two files really are near-identical.
        assert np.abs(_gray64(entry["test"]) - _gray64(entry["train"])).mean() < THRESHOLD
        # ...and renamed: the copies never share a file name.
        assert entry["test"].rsplit("/", 1)[-1] != entry["train"].rsplit("/", 1)[-1]


def test_check_data_reports_the_same_leaks_with_labels(bone_break_dir, real_leaks):
    leaks = real_leaks[0]
    summary = check_data(get_recipe("bone_fracture"), str(bone_break_dir))
    assert summary["sizes"] == {"train": 989, "test": 140}
    assert summary["leaked_count"] == len(summary["leaked_test_images"]) == len(leaks)
    assert {e["test"] for e in summary["leaked_test_images"]} == {e["test"] for e in leaks}
    for entry in summary["leaked_test_images"]:
        assert entry["test_id"].split("/")[1] == "Test" and entry["train_id"].split("/")[1] == "Train"
        assert entry["test_label"] and entry["train_label"]


def _dhash(img: Image.Image) -> int:
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def test_synthetic_copies_are_found_and_hash_twins_are_not(tmp_path):
    rng = np.random.default_rng(0)
    xray = Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8)).resize((360, 480)).convert("RGB")
    bright = Image.fromarray(np.tile(np.linspace(0, 255, 200), (150, 1)).astype(np.uint8)).convert("RGB")
    faint = Image.fromarray(np.tile(np.linspace(100, 160, 200), (150, 1)).astype(np.uint8)).convert("RGB")
    assert _dhash(bright) == _dhash(faint)  # a difference hash cannot tell these two apart...

    paths = {}
    for name, img in {"train_xray.png": xray, "train_ramp.png": bright}.items():
        img.save(tmp_path / name)
        paths[name] = str(tmp_path / name)
    buffer = io.BytesIO()
    xray.save(buffer, "JPEG", quality=92)  # a renamed, re-encoded copy
    (tmp_path / "renamed_copy.jpg").write_bytes(buffer.getvalue())
    faint.save(tmp_path / "faint_ramp.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")

    train = [paths["train_xray.png"], paths["train_ramp.png"]]
    test = [str(tmp_path / "faint_ramp.png"), str(tmp_path / "renamed_copy.jpg"), str(tmp_path / "broken.jpg")]
    leaks = find_leaked_test_images(train, test)
    assert [(e["test"], e["train"]) for e in leaks] == [(test[1], train[0])]  # ...the pixel check can
    assert 0 <= leaks[0]["mad"] < THRESHOLD

    # In-memory images (HF datasets) work too, named by index or id.
    leaks = find_leaked_test_images([xray, bright], [faint, xray], test_ids=["a", "b"])
    assert [(e["test"], e["train"], e["test_id"]) for e in leaks] == [("test[1]", "train[0]", "b")]


def test_leaked_images_can_be_dropped_from_the_test_split(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    train = datasets.Dataset.from_list([{"image": images[0], "target": "a", "id": "tr0"},
                                        {"image": images[1], "target": "b", "id": "tr1"}])
    test = datasets.Dataset.from_list([{"image": images[1], "target": "a", "id": "te0"},
                                       {"image": images[2], "target": "a", "id": "te1"},
                                       {"image": images[3], "target": "b", "id": "te2"}])
    leaks = leaked_test_images({"train": train, "test": test})
    assert [(e["test_id"], e["train_id"], e["test_label"], e["train_label"]) for e in leaks] == [("te0", "tr1", "a", "b")]
    kept = drop_leaked(test, leaks)
    assert kept["id"] == ["te1", "te2"]
    assert [r["id"] for r in drop_leaked(test.to_list(), leaks)] == ["te1", "te2"]


@pytest.mark.slow
def test_check_data_command_writes_the_summary_json(bone_break_dir, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, "-m", "unsloth_med.cli", "check-data", "--recipe", "bone_fracture",
                           "--data_dir", str(bone_break_dir), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["sizes"] == {"train": 989, "test": 140}
    assert len(summary["leaked_test_images"]) >= 12 and "leaked test images:" in done.stdout
