"""The package list in pyproject.toml must name every Python package of the tree, or an install
silently ships without it (kvlayer.connectors lives outside kvlayer/, so discovery cannot find it)."""

from __future__ import annotations

import importlib

import tomllib

from tests.conftest import REPO


def _tree_packages() -> set[str]:
    found = set()
    for root, prefix in (("kvlayer", "kvlayer"), ("connectors", "kvlayer.connectors")):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root).parts
            found.add(".".join((prefix, *rel)))
    return found


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _tree_packages()


def test_connectors_importable_as_kvlayer_connectors():
    mod = importlib.import_module("kvlayer.connectors")
    assert mod.__file__ is not None and "connectors" in mod.__file__
