"""The data checks' per-file cache (data/check_cache.py): an unchanged file is decoded once across runs, a changed
or broken one every time, and a damaged cache changes no result."""
from __future__ import annotations

import shutil
import sqlite3

import datasets
import pytest
from PIL import Image

import unsloth_med.data.checks as checks
import unsloth_med.data.validate as validate
from unsloth_med.data.check_cache import FILE_NAME
from unsloth_med.data.checks import leaked_test_images
from unsloth_med.data.validate import validate_splits


@pytest.fixture
def xray_splits(bone_break_dir, tmp_path, monkeypatch):
    """Eight real X-rays for training (one of them a broken file), two for testing, one a renamed copy of a
    training image; a cache folder of the test's own."""
    monkeypatch.setenv("UNSLOTH_MED_CACHE", str(tmp_path / "cache"))
    files = sorted((bone_break_dir / "Bone Break Classification").rglob("*.jpg"))[:9]
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for k, source in enumerate(files):
        paths.append(folder / f"x{k}.jpg")
        shutil.copy(source, paths[-1])
    shutil.copy(paths[2], folder / "renamed_copy.jpg")
    (folder / "broken.jpg").write_bytes(paths[0].read_bytes()[:300])  # a truncated download
    train = [str(p) for p in paths[:7]] + [str(folder / "broken.jpg")]
    test = [str(paths[8]), str(folder / "renamed_copy.jpg")]

    def splits():
        rows = lambda names, split: [{"image": p, "target": "a", "id": f"{split}{k}"}  # noqa: E731
                                     for k, p in enumerate(names)]
        return {"train": datasets.Dataset.from_list(rows(train, "tr")),
                "test": datasets.Dataset.from_list(rows(test, "te"))}
    return splits, folder


def _counting_decodes(monkeypatch) -> list[str]:
    """Every file the two checks decode, by wrapping the package's own image loader where each one calls it."""
    decoded: list[str] = []
    for module in (validate, checks):
        real = module.load_image

        def counted(source, *args, _real=real, **kwargs):
            decoded.append(str(source))
            return _real(source, *args, **kwargs)
        monkeypatch.setattr(module, "load_image", counted)
    return decoded


def _check(splits):
    checked, skipped = validate_splits(splits, image_size=448, max_bad_fraction=0.5)
    leaks = leaked_test_images(checked)
    return [(s["id"], s["reason"]) for s in skipped], [(e["test_id"], e["train_id"], e["mad"]) for e in leaks]


def test_a_second_run_decodes_only_what_changed_or_failed(xray_splits, monkeypatch, tmp_path):
    splits, folder = xray_splits
    decoded = _counting_decodes(monkeypatch)
    first = _check(splits())
    skipped, leaks = first
    assert [row for row, _ in skipped] == ["tr7"] and [(t, tr) for t, tr, _ in leaks] == [("te1", "tr2")]
    assert len(decoded) == 10 + 9  # validation: all 10 files; thumbnails: the 9 usable ones
    assert (tmp_path / "cache" / FILE_NAME).is_file()

    decoded.clear()
    assert _check(splits()) == first  # the same skips, the same leaks, to the same mean difference
    assert decoded == [str(folder / "broken.jpg")]  # a failure is never kept: checked, and reported, again

    decoded.clear()
    with Image.open(folder / "x0.jpg") as img:  # a training image replaced by a different picture
        img.rotate(90, expand=True).save(folder / "renamed_copy.jpg")
    skipped, leaks = _check(splits())
    assert sorted(decoded) == sorted([str(folder / "broken.jpg")] + [str(folder / "renamed_copy.jpg")] * 2)
    assert [row for row, _ in skipped] == ["tr7"] and leaks == []  # the copy is gone, and so is the leak


def test_a_damaged_or_unusable_cache_changes_no_result(xray_splits, monkeypatch, tmp_path):
    splits, _ = xray_splits
    first = _check(splits())
    database = tmp_path / "cache" / FILE_NAME
    with sqlite3.connect(database) as db:  # kept thumbnails of the wrong size: made again
        db.execute("UPDATE results SET value = x'00' WHERE key LIKE 'thumbnail:%'")
    decoded = _counting_decodes(monkeypatch)
    assert _check(splits()) == first and len(decoded) == 1 + 9

    database.write_bytes(b"not a database" * 100)  # a damaged file: the checks run as without a cache
    decoded.clear()
    assert _check(splits()) == first and len(decoded) == 10 + 9
