"""Listings as people write them: label spelling variants, repeated rows, Windows paths, data behind a symlink."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from unsloth_med.data.sources import load_recipe_data
from unsloth_med.data.tables import load_folders, load_table
from unsloth_med.recipes.resolve import placeholder, resolve_recipe


def _png(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 12), shade).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_labels_differing_in_case_or_spacing_are_one_class_with_a_warning_naming_them(tmp_path, caplog):
    spellings = ["Normal"] * 4 + ["normal "] * 2 + ["NORMAL"] + ["Fracture"] * 5 + ["fracture"]
    rows = [{"path": f"{i}.png", "label": label} for i, label in enumerate(spellings)]
    for row in rows:
        _png(tmp_path / row["path"])
    listing = _jsonl(tmp_path / "labels.jsonl", rows)  # JSON keeps the trailing space that a CSV reader strips
    with caplog.at_level(logging.WARNING):
        splits = load_table(listing, test_fraction=0.3)
    found = Counter(list(splits["train"]["target"]) + list(splits["test"]["target"]))
    assert found == {"Normal": 7, "Fracture": 6}  # the most frequent spelling is kept
    merged = [m for m in _warnings(caplog) if "differ only in case or spacing" in m]
    assert len(merged) == 2
    # values are stripped when read ('normal ' -> 'normal'); the rest is named as written
    assert any("'Normal'" in m and "'normal' (2)" in m and "'NORMAL' (1)" in m for m in merged)
    # a configured class list decides the spelling
    again = load_table(listing, labels=("fracture", "normal"), test_fraction=0.3)
    assert set(again["train"]["target"]) | set(again["test"]["target"]) == {"fracture", "normal"}


def test_a_classify_run_says_each_data_warning_once(tmp_path, caplog):
    """The classify recipe reads its labels from the data, then the run loads the data: the merged-labels and
    held-out-split warnings are said by the load, once each (the label discovery said them too: twice)."""
    labels = ["Normal"] * 5 + ["normal"] + ["Broken"] * 6
    rows = [{"path": f"{i}.png", "label": label} for i, label in enumerate(labels)]
    for row in rows:
        _png(tmp_path / row["path"], shade=20 * len(row["label"]))
    listing = _jsonl(tmp_path / "labels.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        recipe = resolve_recipe(placeholder("classify"), {"data_dir": str(listing)})
        splits = load_recipe_data(recipe, str(listing))
    assert recipe.labels == ("Broken", "Normal") and len(splits["train"]) + len(splits["test"]) == 12
    said = Counter(m.split(": ", 1)[1][:40] for m in _warnings(caplog))
    assert said and set(said.values()) == {1}, said
    assert any("differ only in case or spacing" in m for m in _warnings(caplog))


def test_class_folders_differing_only_in_case_are_one_class(tmp_path, caplog):
    for i in range(4):
        _png(tmp_path / "Normal" / f"{i}.png"), _png(tmp_path / "Broken" / f"{i}.png")
    _png(tmp_path / "normal" / "x.png")
    with caplog.at_level(logging.WARNING):
        splits = load_folders(tmp_path, test_fraction=0.25)
    assert set(splits["train"]["target"]) | set(splits["test"]["target"]) == {"Normal", "Broken"}
    assert any("'normal' (1)" in m for m in _warnings(caplog))


def test_duplicate_rows_are_counted_and_dropped_with_drop_duplicates(tmp_path, caplog):
    for i in range(6):
        _png(tmp_path / f"{i}.png", shade=40 * i)
    lines = [f"{i}.png,{'a' if i % 2 else 'b'}" for i in range(6)]
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label\n" + "\n".join(lines + lines[:2] + lines[:1]) + "\n")  # 3 repeats
    with caplog.at_level(logging.WARNING):
        kept = load_table(listing, test_fraction=0.3)
    assert len(kept["train"]) + len(kept["test"]) == 9
    assert any("3 rows repeat an earlier row" in m and "--drop_duplicates" in m for m in _warnings(caplog))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dropped = load_table(listing, test_fraction=0.3, drop_duplicates=True)
    images = list(dropped["train"]["image"]) + list(dropped["test"]["image"])
    assert len(images) == 6 and len(set(images)) == 6
    assert any("dropped 3 duplicate rows" in m for m in _warnings(caplog))
    # the option as the CLI and config.yaml give it (data.drop_duplicates), through the recipe to the loader
    recipe = resolve_recipe(placeholder("classify"), {"data_dir": str(listing), "drop_duplicates": True})
    assert recipe.source.drop_duplicates is True
    splits = load_recipe_data(recipe)
    assert len(splits["train"]) + len(splits["test"]) == 6


def test_drop_duplicates_is_a_data_option_of_the_cli():
    from unsloth_med.config import DataArgs

    assert DataArgs(drop_duplicates=True).drop_duplicates is True
    assert DataArgs().drop_duplicates is False


def test_windows_separators_in_listed_paths_are_accepted(tmp_path):
    for name in ("a", "b", "c", "d"):
        _png(tmp_path / "images" / "sub" / f"{name}.png")
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label,split\n" + "images\\sub\\a.png,x,train\nimages\\sub\\b.png,y,train\n"
                       "images/sub/c.png,x,test\nimages\\sub\\d.png,y,test\n")
    splits = load_table(listing)
    images = list(splits["train"]["image"]) + list(splits["test"]["image"])
    assert images == [str(tmp_path / "images" / "sub" / f"{n}.png") for n in "abcd"]
    assert all(Path(p).is_file() for p in images)


def test_one_path_rule_for_listings_and_folders_behind_a_symlink(tmp_path):
    """A listing and the class folders beside it name each image the same way when the data sits behind a symlink
    (listing paths were symlink-resolved, folder paths were not)."""
    real = tmp_path / "real"
    lines = []
    for label in ("cat", "dog"):
        for i in range(4):
            _png(real / "classes" / label / f"{i}.png", shade=60 * i)
            lines.append(f"classes/{label}/{i}.png,{label}")
    (real / "labels.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    link = tmp_path / "shared"
    link.symlink_to(real, target_is_directory=True)
    from_listing = load_table(link / "labels.csv", test_fraction=0.25)
    from_folders = load_folders(link / "classes", test_fraction=0.25)
    for split in ("train", "test"):
        assert sorted(zip(from_listing[split]["image"], from_listing[split]["target"])) == \
            sorted(zip(from_folders[split]["image"], from_folders[split]["target"]))
    assert all(p.startswith(str(link) + "/") for p in from_listing["train"]["image"])  # as named, not resolved


def test_recipe_class_folders_follow_the_same_path_rule(tmp_path, monkeypatch):
    from unsloth_med.data.sources import load_class_folders

    for label in ("cat", "dog"):
        _png(tmp_path / "data" / label / "0.png")
    monkeypatch.chdir(tmp_path)
    rows = load_class_folders(Path("data"))  # a relative --data_dir: absolute in every row
    assert {r["image"] for r in rows["train"]} == {str(tmp_path / "data" / c / "0.png") for c in ("cat", "dog")}


@pytest.mark.parametrize("shared", ["real", "symlink"])
def test_real_bone_break_listing_matches_its_folders_through_a_symlink(bone_break_dir, tmp_path, shared):
    """The real dataset, reached directly and through a symlink to it (how a checkout's ../shared often is)."""
    from unsloth_med.recipes.resolve import build_generic_recipe

    root = bone_break_dir
    if shared == "symlink":
        root = tmp_path / "bone-break"
        root.symlink_to(bone_break_dir.resolve(), target_is_directory=True)
    recipe = build_generic_recipe("classify", data_source=str(root / "labels.csv"))
    from_csv = load_recipe_data(recipe)
    from_folders = load_recipe_data(recipe, str(root / "Bone Break Classification"))
    assert sorted(from_csv["test"]["image"]) == sorted(from_folders["test"]["image"])
    assert all(p.startswith(str(root)) for p in from_csv["test"]["image"])
