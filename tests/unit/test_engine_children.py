"""The qcow2 engine's children are handed in, never opened by the engine (issue 12).

The block layer (``dirtybits.block.children``) opens an image's backing file and external data
file, by the header's names or as the caller gives them, and hands them to
``Qcow2Image.open``; the engine and the on-disk format layer import nothing above them.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest

from dirtybits.block.children import (
    HeaderChildren,
    open_backing_file,
    open_data_file,
    open_qcow2,
)
from dirtybits.block.open import open_image
from dirtybits.block.raw import RawImage
from dirtybits.errors import ImageError, ReadOnlyError, UsageError
from dirtybits.qcow2.children import BackingImage, DataFile
from dirtybits.qcow2.image import Qcow2Image

SRC = Path(__file__).resolve().parents[2] / "src" / "dirtybits"
LOWER = ("qcow2", "format")  # packages that must not look up
UPPER = ("dirtybits.block", "dirtybits.services", "dirtybits.cli", "dirtybits.proto",
         "dirtybits.api")
KiB, MiB = 1 << 10, 1 << 20


# ---------------------------------------------------------------------------- layering
def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """Every module ``path`` (the module ``module``, by default its name under src/)
    imports, anywhere in it (top level, inside functions, under ``if TYPE_CHECKING``),
    relative imports resolved; and modules named to ``importlib.import_module`` /
    ``__import__`` as a string constant."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (module or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package.pop()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute)
                   and node.func.attr == "import_module"))):
            found.append((node.lineno, node.args[0].value))
    return found


def _lower_modules() -> list[Path]:
    files = sorted(p for pkg in LOWER for p in (SRC / pkg).rglob("*.py"))
    assert len(files) > 10, f"no sources found under {SRC}"
    return files


@pytest.mark.parametrize("path", _lower_modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_engine_and_format_import_nothing_above(path: Path) -> None:
    bad = [f"{path.relative_to(SRC)}:{line}: imports {mod}" for line, mod in _imported(path)
           if any(mod == up or mod.startswith(up + ".") for up in UPPER)]
    assert not bad, "\n".join(bad)


def test_the_import_scan_sees_hidden_imports(tmp_path: Path) -> None:
    """The scan itself: a function-local, a TYPE_CHECKING, a relative and an importlib
    import of the block layer are all found."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from dirtybits.block.node import BlockNode\n"
        "def f():\n    from ..block import raw\n    import dirtybits.cli.main\n"
        "    import importlib\n    importlib.import_module('dirtybits.proto')\n"
        "from .. import api\n")
    mods = [m for _, m in _imported(probe, "dirtybits.qcow2.probe")]
    for want in ("dirtybits.block.node", "dirtybits.block", "dirtybits.cli.main",
                 "dirtybits.proto", "dirtybits.api"):
        assert any(m == want or m.startswith(want + ".") for m in mods), (want, mods)


# ---------------------------------------------------------------------------- helpers
def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def raw_base(tmp_path: Path) -> Path:
    base = tmp_path / "base.raw"
    base.write_bytes(_pattern(2 * MiB, 3))
    return base


# ---------------------------------------------------------------------------- backing
def test_explicit_raw_backing_is_read_through(tmp_path: Path, raw_base: Path) -> None:
    top = tmp_path / "top.qcow2"
    Qcow2Image.create(str(top), 4 * MiB)  # names no backing file: the caller supplies one
    before = _fds()
    backing = open_backing_file(str(raw_base), "raw")
    assert isinstance(backing, RawImage) and isinstance(backing, BackingImage)
    with Qcow2Image.open(str(top), backing=backing) as img:
        assert img.backing is backing
        assert img.read(0, 64 * KiB) == _pattern(2 * MiB, 3)[:64 * KiB]
        assert img.read(2 * MiB - 4 * KiB, 8 * KiB) == _pattern(2 * MiB, 3)[-4 * KiB:] + \
            bytes(4 * KiB)  # past the backing file's end: zeros
        img.write(4 * KiB, b"\xee" * 4 * KiB)  # copy-on-write over the backing data
        assert img.read(0, 12 * KiB) == (_pattern(2 * MiB, 3)[:4 * KiB] + b"\xee" * 4 * KiB
                                         + _pattern(2 * MiB, 3)[8 * KiB:12 * KiB])
        depths = {e.depth for e in img.block_status(0, 4 * MiB)}
        assert depths >= {0, 1}
    # handed in: still the caller's, still open after the image closed
    assert backing.read(0, 4) == _pattern(4, 3)
    backing.close()
    assert raw_base.read_bytes() == _pattern(2 * MiB, 3)  # a backing file is never written
    assert _fds() == before


def test_explicit_backing_through_open_image(tmp_path: Path, raw_base: Path) -> None:
    top = tmp_path / "top.qcow2"
    Qcow2Image.create(str(top), 2 * MiB)
    with open_backing_file(str(raw_base), "raw") as backing:
        with open_image(str(top), "qcow2", readonly=True, backing=backing) as drv:
            assert drv.read(MiB, 4 * KiB) == _pattern(2 * MiB, 3)[MiB:MiB + 4 * KiB]
        with pytest.raises(UsageError):
            open_image(str(raw_base), "raw", readonly=True, backing=backing)


def test_header_backing_is_opened_by_block_and_closed_with_the_image(
        tmp_path: Path, raw_base: Path, caplog: pytest.LogCaptureFixture) -> None:
    mid = tmp_path / "mid.qcow2"
    Qcow2Image.create(str(mid), 2 * MiB, backing_file="base.raw", backing_format="raw")
    top = tmp_path / "top.qcow2"
    Qcow2Image.create(str(top), 2 * MiB, backing_file=str(mid))  # absolute, format probed
    before = _fds()
    with caplog.at_level(logging.DEBUG, logger="dirtybits.block.children"):
        img = open_qcow2(str(top), readonly=True)
    assert any("opening backing file" in r.getMessage() for r in caplog.records)
    try:
        assert isinstance(img.backing, Qcow2Image)
        assert isinstance(img.backing.backing, RawImage)
        assert img.read(0, 8 * KiB) == _pattern(8 * KiB, 3)
        assert {e.depth for e in img.block_status(0, 2 * MiB)} == {2}
    finally:
        img.close()
    assert _fds() == before
    # open_backing=False, and the bare engine: no backing file, unallocated reads as zeros
    for opened in (open_qcow2(str(top), readonly=True, open_backing=False),
                   Qcow2Image.open(str(top), readonly=True)):
        with opened as img:
            assert img.backing is None
            assert img.read(0, 4 * KiB) == bytes(4 * KiB)
    assert _fds() == before


def test_missing_backing_file_leaks_nothing(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    Qcow2Image.create(str(top), MiB, backing_file="gone.qcow2", backing_format="qcow2")
    before = _fds()
    with pytest.raises(ImageError, match=r"Could not open '.*gone\.qcow2': No such file"):
        open_qcow2(str(top))
    assert _fds() == before


def test_backing_loop_is_refused_without_leaks(tmp_path: Path) -> None:
    loop = tmp_path / "loop.qcow2"
    Qcow2Image.create(str(loop), MiB, backing_file="loop.qcow2", backing_format="qcow2")
    before = _fds()
    with pytest.raises(ImageError, match="too deep"):
        open_qcow2(str(loop), readonly=True)
    assert _fds() == before


def test_failed_open_closes_the_children_it_was_given_by_the_opener(
        tmp_path: Path, raw_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = tmp_path / "top.qcow2"
    Qcow2Image.create(str(top), 2 * MiB, backing_file="base.raw", backing_format="raw")

    def fail(self: Qcow2Image, keep: bool) -> None:
        raise ImageError("injected")

    monkeypatch.setattr(Qcow2Image, "_on_writable_open", fail)
    before = _fds()
    with pytest.raises(ImageError, match="injected"):
        open_qcow2(str(top))
    assert _fds() == before
    # a child handed in stays open: it is the caller's
    backing = open_backing_file(str(raw_base), "raw")
    with pytest.raises(ImageError, match="injected"):
        Qcow2Image.open(str(top), backing=backing)
    assert backing.read(0, 4) == _pattern(4, 3)
    backing.close()
    assert _fds() == before


# ---------------------------------------------------------------------------- data file
def test_explicit_data_file_is_used(tmp_path: Path) -> None:
    meta = tmp_path / "meta.qcow2"
    data = tmp_path / "data.raw"
    Qcow2Image.create(str(meta), 2 * MiB, data_file="data.raw", data_file_raw=True)
    before = _fds()
    dfile = open_data_file(str(data), readonly=False)
    assert isinstance(dfile, DataFile)
    with Qcow2Image.open(str(meta), data_file=dfile) as img:
        assert img.data_file is dfile and img.has_data_file
        img.write(64 * KiB, b"\x5a" * 8 * KiB)
        assert img.read(64 * KiB, 8 * KiB) == b"\x5a" * 8 * KiB
        ext = next(iter(img.block_status(64 * KiB, 8 * KiB)))
        assert ext.filename == str(data)
    assert not dfile.closed  # the caller's
    dfile.close()
    assert _fds() == before
    raw = data.read_bytes()
    assert raw[64 * KiB:72 * KiB] == b"\x5a" * 8 * KiB  # data_file_raw: guest offset = file
    # the data file the header names, opened by the block layer (relative to the image)
    with open_qcow2(str(meta), readonly=True) as img:
        assert img.data_file is not None and img.data_file.path == str(data)
        assert img.read(64 * KiB, 8 * KiB) == b"\x5a" * 8 * KiB
    assert _fds() == before


def test_data_file_refusals(tmp_path: Path) -> None:
    meta = tmp_path / "meta.qcow2"
    Qcow2Image.create(str(meta), MiB, data_file="data.raw")
    plain = tmp_path / "plain.qcow2"
    Qcow2Image.create(str(plain), MiB)
    before = _fds()
    with pytest.raises(UsageError, match="'data-file' is required for this image"):
        Qcow2Image.open(str(meta))  # nothing handed in, no opener
    with DataFile.open(str(tmp_path / "data.raw"), readonly=True) as ro:
        with pytest.raises(UsageError, match="can only be set for images with an external"):
            Qcow2Image.open(str(plain), readonly=True, data_file=ro)
        with pytest.raises(ReadOnlyError):
            Qcow2Image.open(str(meta), data_file=ro)  # a writer needs a writable data file
    os.unlink(tmp_path / "data.raw")
    with pytest.raises(ImageError, match=r"Could not open data file '.*data\.raw': No such"):
        open_qcow2(str(meta))
    assert _fds() == before


def test_header_children_opener_is_what_the_engine_asks(tmp_path: Path,
                                                         raw_base: Path) -> None:
    """The block layer's ``ChildOpener``: a backing and a data file named in a header."""
    meta = tmp_path / "meta.qcow2"
    Qcow2Image.create(str(meta), 2 * MiB, backing_file="base.raw", backing_format="raw",
                      data_file="d.raw")
    before = _fds()
    with Qcow2Image.open(str(meta), readonly=True,
                         children=HeaderChildren(open_backing=True)) as img:
        assert img.data_file is not None and img.data_file.path == str(tmp_path / "d.raw")
        assert img.read(0, 4 * KiB) == _pattern(4 * KiB, 3)
    with Qcow2Image.open(str(meta), readonly=True,
                         children=HeaderChildren(open_backing=False)) as img:
        assert img.backing is None and img.data_file is not None
    assert _fds() == before
