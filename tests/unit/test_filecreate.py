"""One creator of image files (``dirtybits.filecreate``) and bounded creation of huge images.

Raw images, the file under a qcow2 image and its data file are all made by ``create_file``, so
what is tested here is what ``dirtybits create``, ``convert`` and ``container create`` run. A
failed creation leaves nothing it made behind and never removes a file that was there. QEMU's
L1 limit (32 MiB of L1 table) is applied by the engine, with QEMU's messages, before anything
is allocated: the CLI runs below are capped at 1 GiB of address space, so a regression that
builds a table for an exabyte fails the test instead of eating the machine.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dirtybits
from dirtybits import filecreate
from dirtybits.block.container import Container
from dirtybits.block.raw import RawImage
from dirtybits.cli.main import main
from dirtybits.errors import ImageIOError, LockError, UsageError
from dirtybits.filecreate import create_file
from dirtybits.qcow2.image import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20
TOO_LARGE = ("The image size is too large for file format 'qcow2' "
             "(try using a larger cluster size)")
SRC = Path(dirtybits.__file__).parent


def test_one_creator() -> None:
    """No module but ``filecreate`` creates files (``O_CREAT``, ``open(..., 'w')``)."""
    creators = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "O_CREAT":
                creators.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "open" and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                    and set(str(node.args[1].value)) & set("wax+")):
                creators.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert creators and all(c.startswith("filecreate.py:") for c in creators), creators


def test_cli_and_api_make_the_same_raw_file(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "cli.raw", tmp_path / "api.raw"
    assert main(["create", "-q", "-f", "raw", str(a), "1025"]) == 0
    RawImage.create(str(b), 1025)
    for p in a, b:
        assert p.stat().st_size == 1536  # rounded up to a sector
        fd = os.open(p, os.O_RDONLY)
        try:  # the first block written (QEMU's O_DIRECT probing), the rest a hole
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 1536
        finally:
            os.close(fd)


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create_file_truncates_an_old_file(tmp_path: Path, prealloc: str) -> None:
    path = tmp_path / "r.raw"
    path.write_bytes(b"\xaa" * (3 * MiB))
    f = create_file(str(path), MiB, prealloc=prealloc)
    f.close()
    assert not f.made
    assert path.read_bytes() == bytes(MiB)
    if prealloc != "off":
        assert path.stat().st_blocks * 512 >= MiB


def test_keep_data_grows_a_drive_and_keeps_its_bytes(tmp_path: Path) -> None:
    drive = tmp_path / "d.raw"
    drive.write_bytes(b"\xab" * 4096)
    create_file(str(drive), MiB, keep_data=True).close()
    data = drive.read_bytes()
    assert data[:4096] == b"\xab" * 4096 and data[4096:] == bytes(MiB - 4096)


def efbig_past(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """A filesystem whose largest file is ``limit`` bytes (ext4's is 16 TiB; tmpfs has none)."""
    real = os.ftruncate

    def ftruncate(fd: int, size: int) -> None:
        if size > limit:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        real(fd, size)

    monkeypatch.setattr(filecreate.os, "ftruncate", ftruncate)


def test_raw_too_large_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    efbig_past(monkeypatch, 64 * MiB)
    new, old = tmp_path / "new.raw", tmp_path / "old.raw"
    old.write_bytes(b"\xcd" * 8192)
    assert main(["create", "-q", "-f", "raw", str(new), "1E"]) == 1
    assert main(["create", "-q", "-f", "raw", str(old), "1E"]) == 1
    assert capsys.readouterr().err == "".join(
        f"dirtybits create: {p}: The image size is too large for file format 'raw'\n"
        for p in (new, old))
    assert not new.exists()  # nothing left to block a retry
    assert old.read_bytes() == b"\xcd" * 8192  # refused before its data was dropped


def test_qcow2_data_file_too_large_removes_both(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    efbig_past(monkeypatch, 64 * MiB)
    img, data = tmp_path / "i.qcow2", tmp_path / "i.data"
    with pytest.raises(ImageIOError) as exc:
        Qcow2Image.create(str(img), 1 << 40, data_file="i.data")
    assert str(exc.value) == TOO_LARGE  # qemu-img's words for EFBIG
    assert not img.exists() and not data.exists()


def test_failed_qcow2_create_removes_what_it_made_only(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: Qcow2Image, size: int) -> None:
        raise ImageIOError("injected", errno=errno.EIO)

    monkeypatch.setattr(Qcow2Image, "resize", fail)
    img, data = tmp_path / "i.qcow2", tmp_path / "i.data"
    with pytest.raises(ImageIOError, match="injected"):
        Qcow2Image.create(str(img), MiB, data_file="i.data")
    assert not img.exists() and not data.exists()
    # a pre-existing image file and raw drive are never removed (nor the drive's data)
    img.write_bytes(b"old")
    data.write_bytes(b"\xab" * 4096)
    with pytest.raises(ImageIOError, match="injected"):
        Qcow2Image.create(str(img), MiB, data_file="i.data", data_file_raw=True)
    assert img.exists()
    assert data.read_bytes()[:4096] == b"\xab" * 4096


def test_image_in_use_is_not_touched(tmp_path: Path) -> None:
    """Truncated only once locked (QEMU's order): a qcow2 image a writer has open refuses
    the creation, and keeps its bytes."""
    path = tmp_path / "busy.qcow2"
    Qcow2Image.create(str(path), MiB)
    with Qcow2Image.open(str(path)) as img:
        img.write(0, b"\x11" * 512)
        img.flush()
        before = path.read_bytes()
        with pytest.raises(LockError):
            RawImage.create(str(path), 2 * MiB)
        with pytest.raises(LockError):
            Qcow2Image.create(str(path), 2 * MiB)
        assert path.read_bytes() == before


def test_qcow2_l1_limit_in_the_engine(tmp_path: Path) -> None:
    """QEMU's limit, whoever creates: 2 PiB with 64 KiB clusters is the largest (32 MiB of
    L1 table), a sector more is refused before any file is touched."""
    path = tmp_path / "big.qcow2"
    for size in (2 << 50) + 512, 1 << 60:
        with pytest.raises(UsageError) as exc:
            Qcow2Image.create(str(path), size)
        assert str(exc.value) == TOO_LARGE
        assert not path.exists()


def test_failed_container_create_leaves_nothing(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.qcow2"

    def fail(self: Qcow2Image, **kw: object) -> None:
        raise ImageIOError("injected", errno=errno.EIO)

    monkeypatch.setattr(Qcow2Image, "update_header", fail)
    with pytest.raises(ImageIOError, match="injected"):
        Container.create(str(path))
    assert not path.exists()
    monkeypatch.undo()
    Container.create(str(path))  # a retry is not blocked


# ---------------------------------------------------------------- under a memory limit
LIMIT = 1 << 30
CAPPED = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))
from dirtybits.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def capped(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CAPPED, *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, message", [
    (["create", "-q", "-f", "qcow2", "x.qcow2", "1E"], f"dirtybits create: x.qcow2: {TOO_LARGE}"),
    (["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "x.qcow2", "129G"],
     f"dirtybits create: x.qcow2: {TOO_LARGE}"),
    (["container", "create", "x.qcow2", "--max-size", "1E"], f"dirtybits container: {TOO_LARGE}"),
    (["container", "create", "x.qcow2", "--max-size", "8E"],
     "dirtybits container: invalid --max-size: '8E'"),
])
def test_absurd_sizes_are_refused_in_bounded_memory(argv: list[str], message: str,
                                                    tmp_path: Path) -> None:
    proc = capped(*argv, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (1, message + "\n")
    assert os.listdir(tmp_path) == []  # nothing left to block a retry


def test_largest_qcow2_and_resize_past_it_in_bounded_memory(tmp_path: Path) -> None:
    proc = capped("create", "-q", "-f", "qcow2", "big.qcow2", "2P", cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    for size in "2251799813686272", "1E":  # a sector past the limit; far past it
        proc = capped("io", "-c", f"truncate {size}", "big.qcow2", cwd=tmp_path)
        assert (proc.returncode, proc.stderr) == (
            1, "dirtybits io: Failed to grow the L1 table: File too large\n")
    with Qcow2Image.open(str(tmp_path / "big.qcow2"), readonly=True) as img:
        assert img.size == 2 << 50
