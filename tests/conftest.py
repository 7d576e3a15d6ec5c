"""Shared fixtures: the real bone-break data, tiny offline models, an isolated cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require(module: str):
    """`module` imported; a package of pyproject's test extra, so in CI its absence is a failure (a broken install
    must not turn the tests that need it into silent skips); elsewhere those tests are skipped."""
    if os.environ.get("CI"):
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"{module} is missing: it is in the test extra (pip install -e '.[test]'): {exc}",
                        pytrace=False)
    return pytest.importorskip(module)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tiny models and generated data go to a per-session cache, never the user's home."""
    if "UNSLOTH_MED_CACHE" not in os.environ:
        os.environ["UNSLOTH_MED_CACHE"] = str(tmp_path_factory.mktemp("unsloth_med_cache"))
    return Path(os.environ["UNSLOTH_MED_CACHE"])


@pytest.fixture(scope="session")
def bone_break_dir() -> Path:
    """The real Kaggle bone-break dataset (../shared/data/bone-break; UNSLOTH_MED_BONE_BREAK overrides).

    In CI it must be there: the tests that read it fail instead of skipping.
    """
    path = Path(os.environ.get("UNSLOTH_MED_BONE_BREAK", REPO.parent / "shared" / "data" / "bone-break"))
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real bone-break data missing at {path} (set UNSLOTH_MED_BONE_BREAK)")
        pytest.skip(f"real bone-break data not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_path():
    """tiny_path(family) -> folder of a tiny random-weight model of that family (built once)."""
    from unsloth_med.models.tiny import tiny_model_path

    return tiny_model_path
