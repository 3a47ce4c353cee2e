"""Hard edges side by side with QEMU 7.2: wrong kinds of paths and sizes past QEMU's limits.

The same command to both tools must fail with the same exit code and the same line (the
program name aside). A FIFO goes to qemu-io's read-write opens only: qemu-img, and qemu-io
with -r, block opening one (dirtybits must not, see tests/unit/test_wrong_paths.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peers import Done, db, sh

pytestmark = pytest.mark.interop


def same_failure(theirs: Done, ours: Done, tool: str, command: str) -> None:
    assert theirs.returncode != 0
    assert ours.returncode == theirs.returncode
    assert ours.stderr.replace(f"dirtybits {command}: ", f"{tool}: ") == theirs.stderr


def wrong(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / kind
    if kind == "adir":
        path.mkdir()
    else:
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["adir", "afifo"])
def test_qemu_io_refuses_a_wrong_path_as_we_do(kind: str, tmp_path: Path) -> None:
    path = wrong(tmp_path, kind)
    argvs = [["-c", "read 0 512"], ["-f", "qcow2", "-c", "read 0 512"],
             ["-f", "raw", "-c", "write 0 512"]]
    if kind == "adir":  # read-only, qemu-io blocks on a FIFO too
        argvs += [["-r", "-c", "read 0 512"], ["-f", "raw", "-r", "-c", "read 0 512"]]
    for args in argvs:
        theirs = sh("qemu-io", *args, path, ok=(1,))
        ours = db("io", *args, path, ok=(1,))
        same_failure(theirs, ours, "qemu-io", "io")


def test_qemu_img_refuses_a_directory_as_we_do(tmp_path: Path) -> None:
    path = wrong(tmp_path, "adir")
    good = tmp_path / "good.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", good, "1M")
    for command, args in (("map", ["-f", "raw", path]), ("map", ["-f", "qcow2", path]),
                          ("compare", [good, path]), ("convert", ["-O", "raw", path, "x.raw"]),
                          ("create", ["-f", "qcow2", path, "1M"]),
                          ("create", ["-f", "raw", path, "1M"])):
        theirs = sh("qemu-img", command, *args, ok=(1, 2))
        ours = db(command, *args, ok=(1, 2))
        if command == "create":  # both print the Formatting line first
            assert ours.stdout == theirs.stdout
        same_failure(theirs, ours, "qemu-img", command)
    assert sorted(os.listdir(path)) == []


def test_resize_past_the_l1_limit_as_qemu_io(tmp_path: Path) -> None:
    """2 PiB is the largest qcow2 with 64 KiB clusters; growing past it fails in both tools
    without building the table (a 1 EiB one would be 16 GiB of L1 entries)."""
    for name in "q.qcow2", "d.qcow2":
        sh("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / name, "1G")
    for size in "2251799813686272", "1E":
        theirs = sh("qemu-io", "-c", f"truncate {size}", tmp_path / "q.qcow2", ok=(0, 1))
        ours = db("io", "-c", f"truncate {size}", tmp_path / "d.qcow2", ok=(0, 1))
        assert theirs.stderr == "qemu-io: Failed to grow the L1 table: File too large\n"
        assert ours.stderr.replace("dirtybits io: ", "qemu-io: ") == theirs.stderr
        assert ours.returncode == theirs.returncode
    sh("qemu-img", "check", tmp_path / "d.qcow2")
    theirs = sh("qemu-img", "info", "--output=json", tmp_path / "q.qcow2").stdout
    ours = sh("qemu-img", "info", "--output=json", tmp_path / "d.qcow2").stdout
    assert '"virtual-size": 1073741824' in theirs and '"virtual-size": 1073741824' in ours
