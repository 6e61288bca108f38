"""The package list in pyproject.toml must name every Python package of the tree, or an install
silently ships without it (kvlayer.connectors lives outside kvlayer/, so discovery cannot find it)."""

from __future__ import annotations

import importlib

import pytest
import tomllib

from tests.conftest import REPO


def _tree_packages() -> set[str]:
    found = set()
    for root, prefix in (("kvlayer", "kvlayer"), ("connectors", "kvlayer.connectors")):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root).parts
            found.add(".".join((prefix, *rel)))
    return found


#: data-only packages mapped from outside kvlayer/ (no __init__.py): the C++ codec source
DATA_PACKAGES = {"kvlayer._csrc": "csrc/cpu"}


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _tree_packages() | set(DATA_PACKAGES)
    for pkg, folder in DATA_PACKAGES.items():
        assert cfg["package-dir"][pkg] == folder and (REPO / folder).is_dir()


def test_wheel_ships_every_package_and_the_codec_source(tmp_path):
    """A non-editable install gets the C++ codec source (compiled on first use) and the connectors."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")  # --no-build-isolation: builds with this environment's setuptools
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("kvlayer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "kvlayer/_csrc/codec.cpp" in names
    assert "kvlayer/connectors/vllm/__init__.py" in names and "kvlayer/rpc/_gen/kvlayer_pb2.py" in names


def test_connectors_importable_as_kvlayer_connectors():
    mod = importlib.import_module("kvlayer.connectors")
    assert mod.__file__ is not None and "connectors" in mod.__file__
