"""Packaging beyond pyproject.toml: the recipe presets ship inside the package.

The YAML presets live at the top of the repository, in recipes/<recipe>/*.yaml (where the design card
and the README name them). A wheel maps that folder to the package `unsloth_med.presets`, so an installed
package finds them beside its code; `config.presets_dir()` looks there first, then at the checkout's
recipes/ (editable installs and PYTHONPATH runs). tests/test_packaging.py builds and installs the wheel.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["unsloth_med", "unsloth_med.*"]) + ["unsloth_med.presets"],
    package_dir={"unsloth_med.presets": "recipes"},
    package_data={"unsloth_med.presets": ["*/*.yaml"]},
)
