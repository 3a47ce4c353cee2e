"""Image locks both ways with QEMU 7.2: the same OFD bytes, the same refusals, the same words.

A holder (``qemu-io`` or ``dirtybits io`` reading commands from a pipe that stays open) keeps
an image open; the other side's tools must refuse what QEMU would refuse, with QEMU's message
(program name aside), and leave the file untouched; ``-U`` reads past a writer. The byte sets
held are compared with /proc/locks, file by file (image, backing file, data file).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import peers
from dirtybits import filelock

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not filelock.locking_supported(), reason="no OFD locks")]

CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]  # the dirtybits_cli fixture
WAIT_S = 60.0  # a generous bound for a holder to exit on a loaded machine

WRITE = 'Failed to get "write" lock\nIs another process using the image [{}]?\n'
SHARED_WRITE = 'Failed to get shared "write" lock\nIs another process using the image [{}]?\n'


def held_bytes(path: Path) -> set[int]:
    """Bytes of ``path`` some open file description holds an OFD lock on (/proc/locks)."""
    ino = os.stat(path).st_ino
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:
                continue
            if parts[1] == "OFDLCK" and int(parts[5].split(":")[2]) == ino:
                out.update(range(int(parts[6]), int(parts[7]) + 1))
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def holding(cmd: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """Run an interactive holder (commands on stdin) until it has opened its image.

    The answer to a first ``read`` proves the open (and so every lock, backing and data file
    included) is complete: both tools open before reading any command.
    """
    proc = peers.session(*cmd, cwd=cwd, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if "read 512/512 bytes" not in line:
            pytest.fail(f"holder {cmd} did not open: {line!r} {proc.stderr.read()!r}")
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=WAIT_S)
        proc.stdout.close()
        proc.stderr.close()


def ours(*args: str) -> list[str]:
    return [*peers.DIRTYBITS, *args]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return peers.run(*cmd, cwd=cwd)


def same_refusal(q: subprocess.CompletedProcess[str], d: subprocess.CompletedProcess[str],
                 qprog: str, dprog: str) -> None:
    assert d.returncode == q.returncode
    assert d.stderr.replace(f"{dprog}:", "<prog>:") == q.stderr.replace(f"{qprog}:", "<prog>:")


def make(tools: dict[str, str], workdir: Path, kind: str) -> tuple[str, list[Path]]:
    """An image of ``kind``: (name to open, files whose locks to compare)."""
    qimg = tools["qemu-img"]
    if kind == "raw":
        peers.sh(qimg, "create", "-q", "-f", "raw", "d.raw", "1M", cwd=workdir)
        return "d.raw", [workdir / "d.raw"]
    if kind == "backing":
        peers.sh(qimg, "create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=workdir)
        peers.sh(qimg, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 "a.qcow2", cwd=workdir)
        return "a.qcow2", [workdir / "a.qcow2", workdir / "base.qcow2"]
    if kind == "data-file":
        peers.sh(qimg, "create", "-q", "-f", "qcow2", "-o", "data_file=a.data", "a.qcow2", "1M",
                 cwd=workdir)
        return "a.qcow2", [workdir / "a.qcow2", workdir / "a.data"]
    peers.sh(qimg, "create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=workdir)
    return "a.qcow2", [workdir / "a.qcow2"]


@pytest.mark.parametrize("mode", [(), ("-r",), ("-r", "-U")], ids=["rw", "ro", "ro-U"])
@pytest.mark.parametrize("kind", ["qcow2", "backing", "data-file", "raw"])
def test_same_bytes_as_qemu_io(qemu_tools: dict[str, str], workdir: Path, kind: str,
                               mode: tuple[str, ...]) -> None:
    name, files = make(qemu_tools, workdir, kind)
    fmt = ["-f", "raw" if kind == "raw" else "qcow2"]
    with holding([qemu_tools["qemu-io"], *fmt, *mode, name], workdir):
        qemu = [held_bytes(f) for f in files]
    assert not any(held_bytes(f) for f in files)
    with holding(ours("io", *fmt, *mode, name), workdir):
        mine = [held_bytes(f) for f in files]
    assert mine == qemu
    assert qemu[0]  # something was compared


def test_qemu_io_writer_refuses_dirtybits(qemu_tools: dict[str, str], workdir: Path) -> None:
    name, (img,) = make(qemu_tools, workdir, "qcow2")
    qio = qemu_tools["qemu-io"]
    with holding([qio, name], workdir):
        before = sha(img)
        d = run(ours("io", "-c", "write -P 0xab 0 4k", name), workdir)
        assert d.returncode == 1
        assert d.stderr == f"dirtybits io: can't open device {name}: " + WRITE.format(name)
        same_refusal(run([qio, "-c", "write -P 0xab 0 4k", name], workdir), d,
                     "qemu-io", "dirtybits io")
        assert sha(img) == before  # refused before anything was read or written
        d = run(ours("io", "-r", "-c", "read 0 4k", name), workdir)
        assert d.stderr.endswith(SHARED_WRITE.format(name))
        same_refusal(run([qio, "-r", "-c", "read 0 4k", name], workdir), d,
                     "qemu-io", "dirtybits io")
        d = run(ours("io", "-U", "-c", "read 0 4k", name), workdir)
        same_refusal(run([qio, "-U", "-c", "read 0 4k", name], workdir), d,
                     "qemu-io", "dirtybits io")
        assert "force-share=on can only be used with read-only images" in d.stderr
        d = run(ours("io", "-r", "-U", "-c", "read -P 0 0 4k", name), workdir)
        assert d.returncode == 0, d.stderr
        for cmd in (["map", name], ["compare", name, name], ["convert", "-O", "raw", name,
                                                                 "out.raw"]):
            q = run([qemu_tools["qemu-img"], *cmd], workdir)
            d = run(ours(*cmd), workdir)
            assert d.returncode == q.returncode != 0
            same_refusal(q, d, "qemu-img", f"dirtybits {cmd[0]}")
            assert d.stderr.endswith(SHARED_WRITE.format(name))
            d = run(ours(cmd[0], "-U", *cmd[1:]), workdir)
            assert d.returncode == 0, d.stderr
        assert sha(img) == before


def test_dirtybits_writer_refuses_qemu(qemu_tools: dict[str, str], workdir: Path) -> None:
    name, (img,) = make(qemu_tools, workdir, "qcow2")
    qio, qimg = qemu_tools["qemu-io"], qemu_tools["qemu-img"]
    with holding(ours("io", name), workdir) as holder:
        assert holder.stdin is not None
        assert held_bytes(img) == {100, 101, 103, 201, 203}
        holder.stdin.write("write -P 0x5a 0 64k\nflush\n")
        holder.stdin.flush()
        q = run([qio, "-c", "write -P 0xab 0 4k", name], workdir)
        assert q.returncode == 1
        assert q.stderr == f"qemu-io: can't open device {name}: " + WRITE.format(name)
        q = run([qio, "-r", "-c", "read 0 4k", name], workdir)
        assert q.stderr.endswith(SHARED_WRITE.format(name))
        for sub in (["info"], ["check"], ["map"]):
            q = run([qimg, *sub, name], workdir)
            assert q.returncode != 0
            assert q.stderr == f"qemu-img: Could not open '{name}': " + SHARED_WRITE.format(name)
            q = run([qimg, *sub, "-U", name], workdir)
            assert q.returncode == 0, q.stderr
        # a second dirtybits writer is refused like QEMU's; a -U reader is not
        d = run(ours("io", "-c", "write 0 4k", name), workdir)
        assert d.stderr == f"dirtybits io: can't open device {name}: " + WRITE.format(name)
        assert run(ours("io", "-r", "-U", "-c", "read 0 4k", name), workdir).returncode == 0
    # the holder's writes went through; the image is free and clean again
    assert run([qio, "-c", "read -P 0x5a 0 64k", name], workdir).returncode == 0
    assert run([qimg, "check", name], workdir).returncode == 0


def test_readers_share_and_keep_writers_out(qemu_tools: dict[str, str], workdir: Path) -> None:
    name, (img,) = make(qemu_tools, workdir, "qcow2")
    qio = qemu_tools["qemu-io"]
    with holding(ours("io", "-r", name), workdir):
        assert held_bytes(img) == {100, 201, 203}
        assert run([qio, "-r", "-c", "read 0 4k", name], workdir).returncode == 0
        assert run([qemu_tools["qemu-img"], "info", name], workdir).returncode == 0
        assert run(ours("io", "-r", "-c", "read 0 4k", name), workdir).returncode == 0
        q = run([qio, "-c", "write 0 4k", name], workdir)
        assert q.stderr.endswith(WRITE.format(name))
        d = run(ours("io", "-c", "write 0 4k", name), workdir)
        same_refusal(q, d, "qemu-io", "dirtybits io")
    with holding([qio, "-r", name], workdir):
        assert run(ours("io", "-r", "-c", "read 0 4k", name), workdir).returncode == 0
        d = run(ours("io", "-c", "write 0 4k", name), workdir)
        assert d.stderr.endswith(WRITE.format(name))


def test_backing_file_in_use(qemu_tools: dict[str, str], workdir: Path) -> None:
    name, (img, base) = make(qemu_tools, workdir, "backing")
    qio = qemu_tools["qemu-io"]
    with holding([qio, "base.qcow2"], workdir):
        q = run([qio, "-c", "read 0 4k", name], workdir)
        d = run(ours("io", "-c", "read 0 4k", name), workdir)
        assert "Could not open backing file: " + SHARED_WRITE.format("base.qcow2") in q.stderr
        same_refusal(q, d, "qemu-io", "dirtybits io")
    with holding(ours("io", name), workdir):  # our writer holds the backing read-only
        assert held_bytes(base) == {100, 201, 203}
        assert 101 in held_bytes(img)
        q = run([qio, "-c", "write 0 4k", "base.qcow2"], workdir)
        assert q.stderr.endswith(WRITE.format("base.qcow2"))
        assert run([qio, "-r", "-c", "read 0 4k", "base.qcow2"], workdir).returncode == 0


def test_data_file_naming_the_image_itself(qemu_tools: dict[str, str], workdir: Path) -> None:
    """The image's own fd unshares "resize" and "write": QEMU refuses the rw open (its data
    file step fails first on "resize"), so no guest write can land on the qcow2 header."""
    qimg = qemu_tools["qemu-img"]
    peers.sh(qimg, "create", "-q", "-f", "qcow2", "-o", "data_file=self.qcow2", "tmp.qcow2",
             "1M", cwd=workdir)
    (workdir / "self.qcow2").unlink()
    (workdir / "tmp.qcow2").rename(workdir / "self.qcow2")
    before = sha(workdir / "self.qcow2")
    cmd = ["-c", "write -P 0xab 0 4k", "self.qcow2"]
    q = run([qemu_tools["qemu-io"], *cmd], workdir)
    d = run(ours("io", *cmd), workdir)
    assert 'Failed to get shared "resize" lock' in q.stderr
    same_refusal(q, d, "qemu-io", "dirtybits io")
    assert sha(workdir / "self.qcow2") == before
    q = run([qemu_tools["qemu-io"], "-r", "-c", "read 0 4k", "self.qcow2"], workdir)
    d = run(ours("io", "-r", "-c", "read 0 4k", "self.qcow2"), workdir)
    assert q.returncode == d.returncode == 0, d.stderr


@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_convert_onto_its_source_is_refused(qemu_tools: dict[str, str], workdir: Path,
                                            out_fmt: str) -> None:
    """The read-only source unshares "write", so creating the target over it fails before
    anything is truncated (QEMU's create locks first, then truncates)."""
    name, (img,) = make(qemu_tools, workdir, "qcow2")
    peers.sh(qemu_tools["qemu-io"], "-c", "write -P 0x33 0 64k", name, cwd=workdir)
    before = sha(img)
    q = run([qemu_tools["qemu-img"], "convert", "-O", out_fmt, name, name], workdir)
    d = run(ours("convert", "-O", out_fmt, name, name), workdir)
    assert q.stderr == (f"qemu-img: {name}: error while converting {out_fmt}: "
                        + WRITE.format(name))
    same_refusal(q, d, "qemu-img", "dirtybits convert")
    assert sha(img) == before


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_over_an_image_in_use(qemu_tools: dict[str, str], workdir: Path,
                                     fmt: str) -> None:
    name, (img,) = make(qemu_tools, workdir, "qcow2")
    with holding([qemu_tools["qemu-io"], "-r", name], workdir):
        before = sha(img)
        q = run([qemu_tools["qemu-img"], "create", "-f", fmt, name, "2M"], workdir)
        d = run(ours("create", "-f", fmt, name, "2M"), workdir)
        assert q.returncode == 1 and q.stderr.endswith(WRITE.format(name))
        assert d.returncode == q.returncode
        assert d.stderr.replace("dirtybits create:", "qemu-img:") == q.stderr
        assert sha(img) == before


def test_info_and_check_respect_a_writer(qemu_tools: dict[str, str], workdir: Path) -> None:
    """info and check take qemu-img's locks: refused while qemu-io writes, -U reads past."""
    name, (img,) = make(qemu_tools, workdir, "qcow2")
    qio, qimg = qemu_tools["qemu-io"], qemu_tools["qemu-img"]
    with holding([qio, name], workdir):
        before = sha(img)
        for cmd in (["info", name], ["check", name], ["check", "-r", "leaks", name]):
            q = run([qimg, *cmd], workdir)
            d = run(ours(*cmd), workdir)
            assert d.returncode == q.returncode != 0, (cmd, d.stderr)
            same_refusal(q, d, "qemu-img", f"dirtybits {cmd[0]}")
        for cmd in (["info", "-U", name], ["check", "-U", name]):
            d = run(ours(*cmd), workdir)
            assert d.returncode == 0, (cmd, d.stderr)
        assert sha(img) == before
    d = run(ours("check", "-r", "all", name), workdir)  # the writer is gone: allowed again
    assert d.returncode == 0, d.stderr
