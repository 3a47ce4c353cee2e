"""``--recover`` on bitmaps a killed writer (qemu-io, or dirtybits io) left ``in_use``: rebuilt
against a copy taken before the writes, the bitmap is consistent for QEMU (``qemu-img info``
shows no in-use, ``qemu-img check`` is clean) and ``qemu-nbd -B`` serves exactly the granules
whose data changed (by an independent oracle: both images converted to raw by qemu-img)."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.cli.bitmap_recover import apply_recover
from dirtybits.qcow2.image import Qcow2Image
from peers import db, db_session, kill_after, nbd_dirty_runs, qemu_bitmaps, run, session, sh

pytestmark = pytest.mark.interop
SIZE = 16 * 1024 * 1024 + 1536  # not a multiple of 64 KiB
M = 1 << 20
# after the backup; "same" rewrites identical data, "zeros over zeros" changes nothing either
WRITES = [
    "write -P 0xab 100k 4k",
    "write -P 0x11 1M 64k",  # same bytes as before: not a change
    "write -z 10M 512",  # zeros over 0x22: a change
    "write -P 0xcd 16M 1536",  # the partial last granule
    "write -P 0xab 7M 3k",
    "write -P 0 12M 64k",  # zeros over zeros: not a change
    "write -P 0xee 14680000 200000",  # unaligned, several granules
]


def oracle(img: Path, ref: Path, gran: int, tmp: Path) -> list[tuple[int, int]]:
    """Dirty runs from the guest data as qemu-img reads it (granules, merged)."""
    a, b = tmp / "oracle-a.raw", tmp / "oracle-b.raw"
    sh("qemu-img", "convert", "-U", "-O", "raw", img, a)
    sh("qemu-img", "convert", "-U", "-O", "raw", ref, b)
    da, db = a.read_bytes(), b.read_bytes()
    runs: list[tuple[int, int]] = []
    for off in range(0, len(da), gran):
        end = min(off + gran, len(da))
        if da[off:end] != db[off:end]:
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((off, end - off))
    return runs


def killed_writer(img: Path, writer: str) -> None:
    """Run WRITES in one writer process, wait until each is done, then SIGKILL it."""
    proc = (session("qemu-io", "-f", "qcow2", img) if writer == "qemu-io" else
            db_session("io", "--checkpoint=none", img))
    kill_after(proc, WRITES, "wrote")


def recover(img: Path, ref: Path, name: str) -> str:
    """What ``dirtybits bitmap --recover --reference REF IMG NAME`` does after parsing."""
    out = io.StringIO()
    with Qcow2Image.open(str(img), keep_bitmaps=True) as i:
        args = argparse.Namespace(reference=str(ref), reference_format=None, progress=False)
        apply_recover(Qcow2BitmapStore(i), name, args, out)
    return out.getvalue()


@pytest.mark.parametrize("writer", ["qemu-io", "dirtybits-io"])
@pytest.mark.parametrize("ref_format", ["qcow2", "raw"])
def test_killed_writer_bitmap_rebuilt(tmp_path: Path, writer: str, ref_format: str) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE))
    sh("qemu-io", "-c", "write -P 0x11 0 6M", "-c", "write -P 0x22 10M 1M", img)
    sh("qemu-img", "bitmap", "--add", img, "b64k")
    sh("qemu-img", "bitmap", "--add", "-g", "512", img, "b512")
    ref = tmp_path / f"backup.{ref_format}"  # the full backup taken when the bitmaps began
    sh("qemu-img", "convert", "-O", ref_format, img, ref)
    killed_writer(img, writer)
    assert [b["flags"] for b in qemu_bitmaps(img)] == [["in-use", "auto"]] * 2
    for name, gran in (("b64k", 65536), ("b512", 512)):
        summary = recover(img, ref, name)
        assert summary.startswith(f"Bitmap '{name}' rebuilt")
        want = oracle(img, ref, gran, tmp_path)
        assert nbd_dirty_runs(img, name) == want
    assert [b["flags"] for b in qemu_bitmaps(img)] == [["auto"], ["auto"]]
    sh("qemu-img", "check", img)
    # the identical rewrite at 1M and the zeros at 12M are not changes
    for start, length in want:
        assert not (start < M + 65536 and start + length > M)
        assert not (start < 12 * M + 65536 and start + length > 12 * M)
    assert want[0] == (100 * 1024, 4096)
    if writer == "qemu-io":  # (dirtybits io's newly allocated clusters die with it: its L2
        # tables are written at flush, as with QEMU's cache=writeback)
        assert (SIZE - 1536, 1536) in want
        assert nbd_dirty_runs(img, "b64k")[-1] == (16 * M, 1536)  # the partial last granule


def test_qemu_continues_a_recovered_bitmap(tmp_path: Path) -> None:
    """After the rebuild, QEMU opens the image rw, keeps the bits and adds its own."""
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    sh("qemu-img", "bitmap", "--add", img, "b")
    ref = tmp_path / "backup.qcow2"
    shutil.copy(img, ref)
    kill_after(session("qemu-io", "-f", "qcow2", img), ["write -P 1 0 4k"], "wrote")
    recover(img, ref, "b")
    sh("qemu-io", "-c", "write 3M 4k", img)
    assert nbd_dirty_runs(img, "b") == [(0, 65536), (3 * M, 65536)]
    sh("qemu-img", "check", img)


def test_recover_bench_quick_runs_and_checks_pass(tmp_path: Path) -> None:
    """bench/recover_bench.py end to end on a tiny disk: its checks pass (no timing asserted)."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "recover_bench.py"
    out = tmp_path / "recover.json"
    proc = run(sys.executable, bench, "--quick", "--size", "64M", "--dir", tmp_path,
               "--json", out, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True and results["problems"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["recover.json"]  # scratch cleaned up


def test_cli_recover(tmp_path: Path) -> None:
    """``dirtybits bitmap --recover`` end to end, in command-line order with other actions."""
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
    sh("qemu-img", "bitmap", "--add", "-g", "4k", img, "b")
    ref = tmp_path / "backup.raw"
    sh("qemu-img", "convert", "-O", "raw", img, ref)
    kill_after(session("qemu-io", "-f", "qcow2", img), ["write -P 7 5M 10k"], "wrote")
    usage = db("bitmap", "--recover", img, "b", ok=None)
    assert usage.returncode != 0 and "--reference" in usage.stderr
    done = db("bitmap", "--recover", "--reference", ref, "--reference-format", "raw", "--dump",
              img, "b")
    assert done.stdout.startswith("Bitmap 'b' rebuilt: 3 granules of 4096 bytes differ")
    assert "   5242880       12288    1  dirty" in done.stdout
    assert nbd_dirty_runs(img, "b") == [(5 * M, 12288)]
    assert [b["flags"] for b in qemu_bitmaps(img)] == [["auto"]]
    sh("qemu-img", "check", img)
