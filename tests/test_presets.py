"""The shipped configs under recipes/ as a user runs them, from their own folder and their own copy of the data."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_shipped_config_names_no_data_outside_where_it_runs(path):
    """data_dir is read relative to where the command runs: a `../shared/...` path (this workspace's copy of the
    X-rays) sent every user who ran the README's command to 'Data not found'."""
    data_dir = (yaml.safe_load(path.read_text()).get("data") or {}).get("data_dir")
    if data_dir is not None:
        assert not Path(data_dir).is_absolute() and ".." not in Path(data_dir).parts, \
            f"{path.relative_to(REPO)}: data_dir {data_dir!r} names one machine's files"


def test_bone_break_csv_config_reads_the_kaggle_folders_its_comment_offers(tmp_path):
    """The Kaggle download has no listing; the config's comment offers its class folders as --data_dir instead:
    they load with the config's own instruction, all ten classes and the download's Train/Test split."""
    from unsloth_med.config import parse_config
    from unsloth_med.data.bone_break import CLASSES, LAYOUT
    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.data.synthetic import write_synthetic_fractures
    from unsloth_med.recipes import get_recipe
    from unsloth_med.recipes.resolve import resolve_recipe

    path = REPO / "recipes" / "classify" / "bone-break-csv.yaml"
    assert '--data_dir "DATA/' + "/".join(LAYOUT) + '"' in path.read_text()
    folders = write_synthetic_fractures(tmp_path / "DATA", train_per_class=2, test_per_class=1, size=16)
    folders = folders.joinpath(*LAYOUT)
    config = parse_config(["--config", str(path), "--data_dir", str(folders), "--output_dir", str(tmp_path / "run")],
                          get_recipe("classify"))
    recipe = resolve_recipe(get_recipe("classify"), config)
    splits = load_recipe_data(recipe, config.data.data_dir)
    assert recipe.labels == tuple(sorted(CLASSES))
    assert recipe.instruction.startswith("You are an expert radiologist.") and "Spiral Fracture" in recipe.instruction
    assert (len(splits["train"]), len(splits["test"])) == (20, 10)
