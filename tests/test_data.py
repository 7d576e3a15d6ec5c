"""The data layer on the real Kaggle layout, and its error messages."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from unsloth_med.data.images import load_image
from unsloth_med.data.sources import download_kaggle, load_class_folders, load_recipe_data
from unsloth_med.data.summary import summarize
from unsloth_med.errors import ConfigError, CredentialsError, DataError, UnsupportedModelError
from unsloth_med.recipes import get_recipe
from unsloth_med.recipes.bone_fracture import CLASSES, RECIPE

TUTORIAL_TRAIN_COUNTS = {
    "Avulsion fracture": 109, "Comminuted fracture": 134, "Fracture Dislocation": 137, "Greenstick fracture": 106,
    "Hairline Fracture": 101, "Impacted fracture": 75, "Longitudinal fracture": 68, "Oblique fracture": 69,
    "Pathological fracture": 116, "Spiral Fracture": 74,
}


def test_real_layout_has_the_tutorials_counts(bone_break_dir, tmp_path):
    splits = load_recipe_data(RECIPE, str(bone_break_dir))
    assert len(splits["train"]) == 989 and len(splits["test"]) == 140
    labels = sorted(set(splits["train"]["target"]))
    assert labels == sorted(CLASSES) and len(labels) == 10
    summary = summarize(RECIPE, splits, tmp_path)
    assert summary["class_counts"]["train"] == TUTORIAL_TRAIN_COUNTS
    assert sum(summary["class_counts"]["test"].values()) == 140
    with Image.open(tmp_path / "samples.png") as grid:
        assert grid.width > 100 and grid.height > 100


def test_sample_grid_shows_each_class_s_first_training_images_in_their_cells(bone_break_dir, tmp_path):
    """samples.png: three training X-rays per class, in label order, each in its own cell under its label band; a
    cell matches its own image (shrunk as the figure shrinks it) far better than the next class's image."""
    import numpy as np

    from unsloth_med.data.summary import sample_grid

    train = load_recipe_data(RECIPE, str(bone_break_dir))["train"]
    targets = train["target"]
    picks = [[j for j, t in enumerate(targets) if t == label][:3] for label in RECIPE.labels]
    cell, band, gutter, scale = 256, 32, 8, 0.75  # the figure: 2.4 inches per 256-pixel cell at 80 dpi
    with Image.open(sample_grid(RECIPE, train, tmp_path / "samples.png")) as png:
        grid = np.asarray(png.convert("RGB"), dtype=float)
    assert grid.shape[:2] == (round(10 * (cell + band) * scale), round(3 * cell * scale))

    def cell_of(row: int, col: int) -> np.ndarray:
        top, left = round((row * (cell + band) + band) * scale), round(col * cell * scale)
        return grid[top:top + round(cell * scale), left:left + round(cell * scale)]

    def expected(index: int) -> np.ndarray:
        image = ImageOps.contain(load_image(train[index]["image"]), (cell - 2 * gutter,) * 2)
        white = Image.new("RGB", (cell, cell), "white")
        white.paste(image, ((cell - image.width) // 2, (cell - image.height) // 2))
        return np.asarray(white.resize((round(cell * scale),) * 2, Image.BILINEAR), dtype=float)

    for row in (0, 4, 9):
        for col in range(3):
            own = np.abs(cell_of(row, col) - expected(picks[row][col])).mean()
            other = np.abs(cell_of(row, col) - expected(picks[(row + 1) % 10][col])).mean()
            assert own < 4 and other > 10 * own, (row, col, own, other)

    # A small image (the demo's are 64 px) grows to fill its cell, as it did when each image had its own axes.
    from datasets import Dataset

    small = Image.fromarray(np.full((64, 32, 3), 40, dtype=np.uint8))
    one = Dataset.from_list([{"image": small, "target": RECIPE.labels[0]}])
    with Image.open(sample_grid(RECIPE, one, tmp_path / "small.png")) as png:
        grid = np.asarray(png.convert("L"), dtype=float)
    dark = np.argwhere(grid[:round((cell + band) * scale), :round(cell * scale)] < 100)
    assert np.ptp(dark[:, 0]) > 0.85 * cell * scale and np.ptp(dark[:, 1]) > 0.4 * cell * scale


def test_an_unreadable_training_image_leaves_its_cell_of_the_sample_grid_empty(tmp_path):
    """With lazy images (a large split, checked from headers) a truncated file can reach samples.png; the grid
    marks its cell, and the run goes on to skip it in training (it stopped the data stage with an ImageError)."""
    import numpy as np
    from datasets import Dataset

    from unsloth_med.data.summary import sample_grid

    paths = []
    for k in range(2):
        path = tmp_path / f"x{k}.png"
        Image.fromarray(np.full((64, 64, 3), 40, dtype=np.uint8)).save(path)
        paths.append(str(path))
    Path(paths[0]).write_bytes(Path(paths[0]).read_bytes()[:40])  # cut off: the header reads, the pixels do not
    rows = Dataset.from_list([{"image": p, "target": RECIPE.labels[0]} for p in paths])
    with Image.open(sample_grid(RECIPE, rows, tmp_path / "samples.png")) as png:
        grid = np.asarray(png.convert("L"), dtype=float)
    cell, band, scale = 256, 32, 0.75
    first = grid[round(band * scale):round((cell + band) * scale), :round(cell * scale)]
    second = grid[round(band * scale):round((cell + band) * scale), round(cell * scale):round(2 * cell * scale)]
    assert first.min() > 200 and second.min() < 100  # the unreadable image's cell is blank, the next one drawn


def test_any_level_of_the_layout_is_accepted(bone_break_dir):
    inner = bone_break_dir / "Bone Break Classification" / "Bone Break Classification"
    rows = load_class_folders(inner, layout=RECIPE.source.layout, labels=CLASSES)
    assert len(rows["train"]) == 989 and len(rows["test"]) == 140


def test_missing_data_folder_says_where_and_how(tmp_path):
    with pytest.raises(DataError, match=r"Data folder not found: .*nowhere.*--data_dir"):
        load_recipe_data(RECIPE, str(tmp_path / "nowhere"))


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DataError, match=r"No class folders found .*something_else.*Point --data_dir"):
        load_recipe_data(RECIPE, str(tmp_path))


def _fake_class_root(tmp_path, names):
    root = tmp_path / "Bone Break Classification" / "Bone Break Classification"
    for name in names:
        for split in ("Train", "Test"):
            (root / name / split).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(root / name / split / "a.png")
    return root


def test_misnamed_class_folder_is_named_in_the_error(tmp_path):
    names = list(CLASSES)
    names[3] = "Greenstik fracture"  # a typo
    _fake_class_root(tmp_path, names)
    with pytest.raises(DataError, match=r"Unknown folders: \['Greenstik fracture'\].*"
                                        r"Missing classes: \['Greenstick fracture'\]"):
        load_recipe_data(RECIPE, str(tmp_path))


def test_class_with_test_images_but_no_training_images(tmp_path):
    root = _fake_class_root(tmp_path, CLASSES)
    shutil.rmtree(root / "Oblique fracture" / "Train")
    with pytest.raises(DataError, match=r"Class 'Oblique fracture' has no training images .*1 test images"):
        load_recipe_data(RECIPE, str(tmp_path))


def test_missing_kaggle_credentials(tmp_path, monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    with pytest.raises(CredentialsError, match=r"Kaggle credentials.*kaggle.json.*--data_dir"):
        download_kaggle(RECIPE.source.id, tmp_path / "dl")


def test_unknown_recipe_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"Unknown recipe 'bone_fractures'.*Did you mean 'bone_fracture'"):
        get_recipe("bone_fractures")


def test_unknown_model_family():
    from unsloth_med.models.families import family_for_model_type

    with pytest.raises(UnsupportedModelError, match=r"'llava_next'.*Supported families: mistral3"):
        family_for_model_type("llava_next")


def test_preparation_counts_images_not_rows(bone_break_dir, tmp_path, caplog):
    """Nine questions about two views each are 18 images prepared; nine questions about three X-rays are three
    (before, both said 'prepared 9 images', and 'from cache' counted rows)."""
    import json
    import logging

    from unsloth_med.data.images import ImageFit
    from unsloth_med.data.prepare import prepare_images

    xrays = [str(p) for p in sorted(bone_break_dir.rglob("*.jpg"))[:18]]
    fit = ImageFit(48, 16)
    views = [{"image": xrays[2 * i], "more_images": json.dumps([xrays[2 * i + 1]]), "target": "yes", "id": str(i)}
             for i in range(9)]
    with caplog.at_level(logging.INFO, logger="unsloth_med.data.prepare"):
        _, stats = prepare_images(views, fit, tmp_path / "cache")
    assert (stats["images"], stats["rows"], stats["from_cache"]) == (18, 9, 0)
    assert "prepared 18 images (0 from cache) for 9 rows" in caplog.text
    questions = [{"image": xrays[i % 3], "target": "yes", "id": str(i)} for i in range(9)]
    _, stats = prepare_images(questions, fit, tmp_path / "cache")
    assert (stats["images"], stats["rows"], stats["from_cache"]) == (3, 9, 3)  # prepared above, as first views
