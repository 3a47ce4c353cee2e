"""Images QEMU compresses with zstd read in a fresh install (issue 11, first item).

``zstandard`` is a declared dependency, so ``scripts/setup`` installs it; before it was, the
decoder existed but a fresh install refused such images. The same image and the same bytes as
QEMU reads them: ``convert -O raw`` equal to qemu-img's, ``io -r read -P`` of each pattern.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peers import db, sh

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("cluster", ["65536", "4096"])
def test_qemu_zstd_image_reads_as_qemu_reads_it(tmp_path: Path, cluster: str) -> None:
    img = tmp_path / "z.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o",
       f"compression_type=zstd,cluster_size={cluster}", img, "4M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -c -P 0x11 0 64k", "-c", "write -c -P 0x22 1M 64k",
       "-c", "write -P 0x33 2M 4k", img)
    # a cluster of random data compresses badly: QEMU stores it uncompressed or barely
    sh("qemu-io", "-f", "qcow2", "-c", "write -c -s /dev/urandom 3M 64k", img)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    db("convert", "-O", "raw", img, ours)
    sh("qemu-img", "convert", "-O", "raw", img, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    db("io", "-r", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 1M 64k",
       "-c", "read -P 0x33 2M 4k", img)
    # really compressed, with zstd: QEMU maps a compressed cluster as data without an offset
    first = json.loads(sh("qemu-img", "map", "--output=json", img).stdout)[0]
    assert first["data"] and "offset" not in first, first
    assert "compression type: zstd" in sh("qemu-img", "info", img).stdout
    sh("qemu-img", "compare", img, ours)
