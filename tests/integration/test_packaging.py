"""The package list in pyproject.toml must name every Python package of the tree, or an install
silently ships without it (kvlayer.connectors lives outside kvlayer/, so discovery cannot find it)."""

from __future__ import annotations

import importlib
import os

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


#: data-only packages mapped from outside kvlayer/ (no __init__.py): the C++ and CUDA kernel sources
DATA_PACKAGES = {"kvlayer._csrc": "csrc"}


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _tree_packages() | set(DATA_PACKAGES)
    for pkg, folder in DATA_PACKAGES.items():
        assert cfg["package-dir"][pkg] == folder and (REPO / folder).is_dir()


def test_wheel_ships_every_package_and_the_kernel_sources(tmp_path):
    """A non-editable install gets the C++ and CUDA kernel sources (compiled on first use, where
    the kernel modules look for them) and the connectors."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")  # --no-build-isolation: builds with this environment's setuptools
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("kvlayer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "kvlayer/_csrc/cpu/codec.cpp" in names
    cu = sorted(p.name for p in (REPO / "csrc" / "cuda").glob("*.cu"))
    assert cu and {f"kvlayer/_csrc/cuda/{n}" for n in cu} <= names
    # ... and the installed package finds them where it looks outside a source tree
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import kvlayer; from kvlayer.codec import _ext, cuda\n"
            f"assert kvlayer.__file__.startswith({str(site)!r}), kvlayer.__file__\n"
            f"assert _ext.SOURCE.is_file() and [p.name for p in cuda.sources()] == {cu!r}\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                   timeout=300)
    assert "kvlayer/connectors/vllm/__init__.py" in names and "kvlayer/rpc/_gen/kvlayer_pb2.py" in names


def test_connectors_importable_as_kvlayer_connectors():
    mod = importlib.import_module("kvlayer.connectors")
    assert mod.__file__ is not None and "connectors" in mod.__file__
