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


# The near-identical, renamed copies in the real data (class, test file, train file), as the search finds them;
# each pair is recomputed independently below. Exactly these 15 of the 140 test images, no more, no fewer.
LEAKED_PAIRS = {
    ('Avulsion fracture',
     '5c7fec45769db28bdd107336f19004336689a4fb804b37af3096741f2879ff02_jumbo_jpeg.rf.68a4d14a09ed5baf1'
     'f8e1c1957ee5a01.jpg',
     'image20_jpeg.rf.66d531034ff0808d7988f5de176b10fa.jpg'),
    ('Comminuted fracture',
     'Radiograph-showing-a-comminuted-fracture-of-the-middle-third-of-the-right-femur-in-a_png.rf.ade9'
     'ed22124189b5d0f8cd51b03033e2.jpg',
     'image16_jpeg.rf.74ef1b77c60e55bcc18234b4339d0bc2.jpg'),
    ('Comminuted fracture',
     'X-ray-2-comminuted-displaced-fracture_png.rf.ace79e6f0ec1e6ec4037943cc83c14d4.jpg',
     'image15_jpeg.rf.cbc07b69b6bdfe826b7dbcbc6264b087.jpg'),
    ('Comminuted fracture',
     'X-ray_of_a_comminuted_hip_fracture_jpg.rf.6725d6fabfddc890e45180cf483808a9.jpg',
     'images36_jpg.rf.2ce55323bfb1307f84aa37212e09dc14.jpg'),
    ('Fracture Dislocation',
     '0-_jumbo_jpeg.rf.29079abb47d5de12076aed66aea08064.jpg',
     'images29_jpg.rf.74ca7c59b0062585c66c1144288d1809.jpg'),
    ('Fracture Dislocation',
     '22097c143c33367ce6a14aab180507_jumbo_jpeg.rf.dba2616edbc6752417d3acf6acee8e6d.jpg',
     'image26_jpeg.rf.abbfe1afb4a112de0cbfe6b100561e9d.jpg'),
    ('Fracture Dislocation',
     '847b5a158bed0311bf28b5cd647088_jumbo_jpg.rf.271ac7bed7b0dc447ad19199a5292c3d.jpg',
     'image2_jpeg.rf.bc16ebd39d77b02f60313cbb8c73a338.jpg'),
    ('Fracture Dislocation',
     '86bc033b86310ef27328c4b723226a_jum422b4ebf41ac2a0d5043f304b7c1a.jpg',
     'image24_jpeg.rf.a60562fafe2b1f49d77d026.jpg'),
    ('Greenstick fracture',
     '001_jumbo_jpeg.rf.ebf440662388fc36df361ce39890acb2.jpg',
     'image18_jpeg.rf.9cc64e018f63d5cf09e55edabbb62ccd.jpg'),
    ('Longitudinal fracture',
     '35d36ae9df9a48426f94b75d0f2939_jumbo_jpeg.rf.c0eebf1735c43ba5de01d321ce10748a.jpg',
     'image14_jpeg.rf.e7c94e1a17c793fbaf3c607c4904561b.jpg'),
    ('Longitudinal fracture',
     '488c4ff0bb5278bbf87f4c0e981dd6_gallery_jpg.rf.87d2f936037e0dfc1614f7518316a543.jpg',
     'image19_jpeg.rf.883f4884d8d4b625872a61ff5333c797.jpg'),
    ('Longitudinal fracture',
     '7d6985744a7187e8af927146b0c2425e_f12207_jpg.rf.2fc543dad580f8ea8d7d4105ca8e4300.jpg',
     'image11_jpeg.rf.84f417f2d5f60cb01cbc6f4835e596a2.jpg'),
    ('Oblique fracture',
     '220px-MalletFinger-PNG_jpg.rf.8eb8b19e344b2ab4d48b4cbeda7b4a80.jpg',
     'Inked220px-MalletFinger-Ppg.rf.8eb8b19e344b2ab4d48b4cbeda7b4a80_LI.jpg'),
    ('Pathological fracture',
     '1-s2-0-S2352187216300080-gr1_jpg.rf.477e8e5de5f8e589b07827541c666829.jpg',
     'images_jpg.rf.4c62e51e3985e99092fcf3fc9f9b10fd.jpg'),
    ('Spiral Fracture',
     '3-s2-0-B978012386456706706X-f06706-04-9780123864567_jpg.rf.dd278033e65199fdc2d4d2eca2c01f7b.jpg',
     'images16_jpg.rf.0eb5b4b3cdd9b94be44c7b3a07adddcf.jpg'),
}


@pytest.fixture(scope="module")
def real_leaks(bone_break_dir):
    root = bone_break_dir / "Bone Break Classification" / "Bone Break Classification"
    train = sorted(glob.glob(str(root / "*" / "Train" / "*.jpg")))
    test = sorted(glob.glob(str(root / "*" / "Test" / "*.jpg")))
    assert len(train) == 989 and len(test) == 140
    start = time.perf_counter()
    leaks = find_leaked_test_images(train, test)
    return leaks, time.perf_counter() - start, train, test


def _pairs(leaks) -> set:
    return {(e["test"].split("/")[-3], e["test"].rsplit("/", 1)[-1], e["train"].rsplit("/", 1)[-1]) for e in leaks}


def test_real_bone_break_data_has_exactly_the_15_leaked_test_images(real_leaks):
    leaks, seconds, train, test = real_leaks
    print(f"\nleaked test images: {len(leaks)} of {len(test)} ({seconds:.1f} s)")
    assert len(leaks) == 15 and _pairs(leaks) == LEAKED_PAIRS
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
    assert ([(e["test_id"], e["train_id"], e["test_label"], e["train_label"]) for e in leaks]
            == [("te0", "tr1", "a", "b")])
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
                           "--data_dir", str(bone_break_dir), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["sizes"] == {"train": 989, "test": 140}
    assert len(summary["leaked_test_images"]) == 15 and "leaked test images:" in done.stdout


def test_a_run_on_the_real_data_scores_both_passes_again_without_its_15_leaked_test_images(
        bone_break_dir, tiny_path, tmp_path, capsys):
    """The whole job on the real bone-break folders (tiny model, one step): the 15 copies stay in the test split
    (the default), and the table is followed by both passes' accuracy on the other 125 test images."""
    import json

    from unsloth_med.cli import train_command
    from unsloth_med.evaluate import classification_metrics

    tiny_path("mistral3")
    out = tmp_path / "run"
    assert train_command(["--data_dir", str(bone_break_dir), "--model", "tiny:mistral3", "--backend", "hf",
                          "--image_size", "64", "--max_steps", "1", "--save_strategy", "no", "--export", "adapter",
                          "--output_dir", str(out)], get_recipe("bone_fracture")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    leaked = {entry["test_id"] for entry in metrics["data"]["leaked_test_images"]}
    held = metrics["without_leaked_test_images"]
    assert len(leaked) == held["leaked_removed"] == 15 and metrics["n_test"] == 140
    for side in ("before", "after"):
        rows = [p for p in json.loads((out / f"eval_{side}.json").read_text())["predictions"] if p["id"] not in leaked]
        expected = classification_metrics([p["target"] for p in rows], [p["prediction"] for p in rows],
                                          metrics[side]["labels"])
        assert held[side]["n"] == len(rows) == 125
        assert held[side]["accuracy"] == pytest.approx(expected["accuracy"])
        assert held[side]["accuracy_ci95"] == pytest.approx(expected["accuracy_ci95"])
    assert held["after_vs_before"]["n"] == 125 and metrics["after_vs_before"]["n"] == 140
    printed = capsys.readouterr().out
    assert "Without the 15 test examples whose image copies a training image (125 left)" in printed
    assert "Without the 15 test examples" in (out / "report.md").read_text()
