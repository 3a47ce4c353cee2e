"""The quick start's main job: the demo runs end to end and its image is clean for QEMU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peers import qemu_img


def test_demo_runs_and_qemu_agrees(dirtybits_cli: Any, tmp_path: Path) -> None:
    out = dirtybits_cli("demo", "--dir", tmp_path / "d", check=True).stdout
    assert "qemu-img's verdict: clean" in out
    assert "   1048576     1048576    1  dirty" in out  # the 1 MiB write at 1 MiB, recorded
    # the daemon: a bitmap added and a write made over QMP, then kill -9 and a restart that
    # recovers both bitmaps from the write-intent map (resilient mode)
    assert "disk/live: 131072 dirty bytes, recording, on disk: open" in out
    assert out.count("on disk: recovered (recovered at open from the write-intent map") == 2
    assert not (tmp_path / "d" / "serve.pid").exists()  # quit removed it
    # a full backup, then an incremental pulled over NBD: only the recovered bitmap's
    # extents (the writes' 16 MiB write-intent region), and the chain restores the disk
    assert "  dirty            0   16777216: copied" in out
    assert "# 16777216 of 1073741824 bytes copied" in out
    assert "Images are identical." in out
    disk = tmp_path / "d" / "disk.qcow2"
    qemu_img("check", disk)
    qemu_img("compare", "-F", "raw", "-f", "qcow2", disk, tmp_path / "d" / "restored.raw")
    qemu_img("compare", tmp_path / "d" / "backup-1-incr.qcow2", disk)
    qemu_img("check", tmp_path / "d" / "backup-1-incr.qcow2")
    # a rerun starts afresh rather than failing on the existing disk
    dirtybits_cli("demo", "--dir", tmp_path / "d", check=True)
