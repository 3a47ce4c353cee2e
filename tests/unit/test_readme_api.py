"""The README's Python API example runs as written (on a fresh image with bitmap b0)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.qcow2.image import Qcow2Image

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "dirtybits.open(" in b)
    Qcow2Image.create(str(tmp_path / "disk.qcow2"), 1 << 30)
    with Qcow2Image.open(str(tmp_path / "disk.qcow2"), keep_bitmaps=True) as img:
        Qcow2BitmapStore(img).add("b0")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out == (
        "[(0, 65536), (1048576, 65536), (2097152, 65536)]\n196608\n")
    with Qcow2Image.open(os.fspath(tmp_path / "disk.qcow2"), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        assert not store.find("b0").in_use  # type: ignore[union-attr]
        assert store.load("b0").count() == 3 * 65536
