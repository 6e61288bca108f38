"""The README's Python example must run as printed (it is the first thing people copy)."""

from __future__ import annotations

import re
import shutil

from tests.conftest import REPO


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README lost its Python example"
    shutil.rmtree("/tmp/kvlayer-example", ignore_errors=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "8 ['cpu', 'cpu']" in out
    shutil.rmtree("/tmp/kvlayer-example", ignore_errors=True)
