"""Imports point down only (DESIGN.md, "Layers"): every import in src/dirtybits, read with
``ast`` (module level, inside functions, under ``TYPE_CHECKING``), against the layer order.

    base (errors, osfile, filelock, filecreate, sizes) < format < qcow2 < bitmap < block
      < api (dirtybits/__init__, dirtybits/api: the public API over block) < proto < services
      < cli

A layer may import its own and every lower layer, except ``proto``: sans-I/O protocol cores
take bytes and give events, so they import only ``base`` and ``format`` (never the engine,
the block layer or the services that drive them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "dirtybits"

ORDER = ("base", "format", "qcow2", "bitmap", "block", "api", "proto", "services", "cli")
BASE_MODULES = frozenset({"errors", "osfile", "filelock", "filecreate", "sizes"})
API_MODULES = frozenset({"__init__", "api"})
# Layers that may import only these (and themselves), whatever their rank.
RESTRICTED = {"proto": frozenset({"base", "format", "proto"})}

# Upward imports known and being removed elsewhere; each is (importer, imported module).
KNOWN_UPWARD: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer of ``dirtybits[.x[.y]]``."""
    parts = module.split(".")
    assert parts[0] == "dirtybits", module
    if len(parts) == 1:
        return "api"  # the package itself: dirtybits/__init__.py
    first = parts[1]
    if first in BASE_MODULES:
        return "base"
    if first in API_MODULES:
        return "api"
    if first in ORDER:
        return first
    raise AssertionError(f"{module}: no layer for 'dirtybits.{first}' (add it to test_layers)")


def allowed(importer: str, imported: str) -> bool:
    a, b = layer_of(importer), layer_of(imported)
    if a in RESTRICTED:
        return b in RESTRICTED[a]
    return ORDER.index(b) <= ORDER.index(a)


def _resolve(path: Path, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from X import ...`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every dirtybits module ``path`` imports; ``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module, else as ``pkg``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(path, node)
            if mod is None:
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                names.append(sub if _is_module(sub) else mod)
        found.update(n for n in names if n == "dirtybits" or n.startswith("dirtybits."))
    return found


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def upward_imports() -> list[tuple[str, str]]:
    bad = []
    for path in all_modules():
        importer = module_name(path)
        for imported in sorted(imports_of(path)):
            if not allowed(importer, imported):
                bad.append((importer, imported))
    return bad


def test_every_module_has_a_layer() -> None:
    for path in all_modules():
        layer_of(module_name(path))


def test_imports_point_down() -> None:
    bad = [pair for pair in upward_imports() if pair not in KNOWN_UPWARD]
    assert not bad, "imports that point up:\n" + "\n".join(
        f"  {a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, b in bad)


def test_known_upward_imports_still_exist() -> None:
    """An allowlist entry whose import is gone must go too, so it cannot hide a new one."""
    stale = KNOWN_UPWARD - set(upward_imports())
    assert not stale, f"these imports are gone: remove them from KNOWN_UPWARD: {sorted(stale)}"


def test_nothing_outside_cli_imports_cli() -> None:
    bad = [(a, b) for a, b in upward_imports() if layer_of(b) == "cli"]
    assert not bad


@pytest.mark.parametrize(("importer", "imported", "ok"), [
    ("dirtybits.block.node", "dirtybits.qcow2.image", True),
    ("dirtybits.qcow2.image", "dirtybits.block.raw", False),
    ("dirtybits.format.qcow2.header", "dirtybits.errors", True),
    ("dirtybits.proto.qemu_io", "dirtybits.sizes", True),
    ("dirtybits.proto.qemu_io", "dirtybits.block.options", False),
    ("dirtybits.services.qemu_io", "dirtybits.proto.qemu_io", True),
    ("dirtybits.block.options", "dirtybits.proto.qemu_io", False),
    ("dirtybits.api", "dirtybits.block.open", True),
    ("dirtybits.api", "dirtybits.cli.main", False),
    ("dirtybits.bitmap.dirty_bitmap", "dirtybits.qcow2.image", True),
    ("dirtybits.qcow2.check", "dirtybits.bitmap.dirty_bitmap", False),
    ("dirtybits.cli.io", "dirtybits.services.qemu_io", True),
])
def test_the_rule(importer: str, imported: str, ok: bool) -> None:
    assert allowed(importer, imported) is ok


def test_imports_are_found_everywhere() -> None:
    """Function bodies, TYPE_CHECKING blocks and ``from pkg import submodule`` all count."""
    imports = imports_of(PACKAGE / "qcow2" / "image.py")
    assert "dirtybits.qcow2.compress" in imports  # inside a method
    assert "dirtybits.qcow2.snapshots" in imports  # ``from dirtybits.qcow2 import snapshots``
    assert "dirtybits.block.driver" in imports_of(PACKAGE / "cli" / "io.py")  # TYPE_CHECKING
