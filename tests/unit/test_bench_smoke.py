"""Smoke test of ``bench/io_bench.py``: the script runs end to end on tiny sizes and its own
correctness checks pass (every run exits 0, ``qemu-img check`` clean, ``qemu-img compare``
identical). No timing is asserted: timings belong to the benchmark's output, not to tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

IO_BENCH = Path(__file__).resolve().parents[2] / "bench" / "io_bench.py"


@pytest.mark.interop
def test_io_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "io.json"
    proc = subprocess.run(
        [sys.executable, str(IO_BENCH), "--quick", "--size", "1M", "--random-ops", "50",
         "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True
    rows = {(r["workload"], r["phase"]) for r in results["results"]}
    assert rows == {(w, p) for w in ("seq 64k", "seq 1M", "random 4k") for p in ("write", "read")}
    tools = {"dirtybits-none", "qemu-none", "dirtybits", "qemu-writeback"}
    assert all(set(r["rate"]) == tools
               for r in results["results"])
    assert [p.name for p in tmp_path.iterdir()] == ["io.json"]  # scratch images cleaned up


BENCH = IO_BENCH.parent


@pytest.mark.interop
def test_bitmap_ops_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                                     tmp_path: Path) -> None:
    """Every case runs through both tools, the results are verified (check clean, same
    bitmaps, identical dump) and the bytes-written counters are read."""
    out = tmp_path / "bitmap_ops.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bitmap_ops_bench.py"), "--quick", "--size", "16G",
         "--big-size", "64G", "--many", "20", "--dump-runs", "100", "--dir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True
    cases = [r["case"].split(" (")[0] for r in results["results"]]
    assert cases == ["bitmap --add", "bitmap --merge", "bitmap --clear", "bitmap --remove",
                     "bitmap --add", "info", "info", "dump"]
    for r in results["results"]:
        assert len(r["seconds"]["dirtybits"]) == len(r["seconds"]["qemu"]) == 1
    # qemu-img rewrites the bitmaps it keeps: the counters must see those writes
    assert all(r["median_wchar"]["qemu"] > 0 for r in results["results"][:5])
    assert [p.name for p in tmp_path.iterdir()] == ["bitmap_ops.json"]


@pytest.mark.interop
def test_tracking_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "tracking.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "tracking_bench.py"), "--quick", "--size", "1M",
         "--workloads", "seq1m,rand4k", "--random-ops", "50", "--big-size", "64G",
         "--dir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True
    cost = {(r["workload"], r["bitmaps"]) for r in results["results"]
            if r["part"] == "tracking cost"}
    assert cost == {(w, n) for w in ("seq 1M", "random 4k") for n in (0, 1, 8)}
    big = [r["case"] for r in results["results"] if r["part"] == "big"]
    assert big == ["close after write 0 4k", "open rw, read 0 512", "open -r, read 0 512"]
    # QEMU rewrites all 8 bitmaps at close: 8 x 16 KiB of bitmap data at least
    assert results["results"][6]["median_wchar"]["qemu"] >= 8 * 16 * 1024
    assert [p.name for p in tmp_path.iterdir()] == ["tracking.json"]


@pytest.mark.interop
def test_resilient_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                                    tmp_path: Path) -> None:
    """Plain, resilient and qemu-io runs pass the bench's checks (images identical, the bitmap
    the same and consistent in all three, the map valid), and the sync counts see the map:
    resilient mode syncs a region's bit before its first write, so it syncs more than plain."""
    out = tmp_path / "resilient.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "resilient_bench.py"), "--quick", "--size", "1M",
         "--random-ops", "50", "--random-span", "16M", "--dir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True
    assert [r["workload"] for r in results["results"]] == ["seq 64k", "seq 1M", "random 4k"]
    for r in results["results"]:
        assert set(r["median_seconds"]) == {"qemu", "plain", "resilient"}
        assert r["syncs"]["resilient"] > r["syncs"]["plain"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["resilient.json"]


@pytest.mark.interop
def test_snapshot_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                                   tmp_path: Path) -> None:
    """Both tools' copy-on-write runs pass the bench's checks (check clean, results equal,
    the snapshot unchanged) and a rate comes out for each cache mode."""
    out = tmp_path / "snapshot.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "snapshot_bench.py"), "--quick", "--size", "8M",
         "--ops", "100", "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["problems"] == []
    assert set(results["writes_per_second"]) == {"none", "writeback"}
    assert [p.name for p in tmp_path.iterdir()] == ["snapshot.json"]


@pytest.mark.interop
def test_extl2_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                                tmp_path: Path) -> None:
    """Both layouts are built, checked (qemu-img check, compare, our convert equal to QEMU's)
    and read by both tools; the scratch directory is removed."""
    out = tmp_path / "extl2.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "extl2_bench.py"), "--quick", "--size", "4M",
         "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert [r["image"] for r in results["results"]] == ["extended L2", "standard L2"]
    for r in results["results"]:
        assert set(r["mib_per_s"]) == {"dirtybits", "qemu-io"}
    assert [p.name for p in tmp_path.iterdir()] == ["extl2.json"]


@pytest.mark.interop
def test_compress_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                                   tmp_path: Path) -> None:
    """Both tools convert -c the same source with zlib and zstd; both outputs check clean and
    compare identical to the source, and with zlib are the very same file."""
    out = tmp_path / "compress.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "compress_bench.py"), "--quick", "--size", "12M",
         "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True
    assert [r["compression"] for r in results["results"]] == ["zlib", "zstd"]
    assert [p.name for p in tmp_path.iterdir()] == ["compress.json"]


@pytest.mark.interop
def test_block_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                                tmp_path: Path) -> None:
    """All three parts run in-process workers (this checkout, and the baseline revision when
    the checkout holds it) and qemu-io; the bitmaps hold exactly the granules each side wrote,
    the facade's reads equal the direct ones, every sha256 query matches."""
    out = tmp_path / "block.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "block_bench.py"), "--quick", "--span", "4M",
         "--big-size", "64G", "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True
    baseline = not any("baseline skipped" in n for n in results["notes"])
    rows = results["results"]
    track = [r for r in rows if r["part"] == "track"]
    assert [(r["write"], r["bitmaps"]) for r in track] == [
        (s, n) for s in (4096, 65536) for n in (0, 1, 8)]
    for r in track:
        sides = {k.split(" ")[0] for k, v in r["cpu_us"].items() if v}
        assert sides == ({"new", "old", "qemu-io"} if baseline else {"new", "qemu-io"})
    facade = [r for r in rows if r["part"] == "facade"]
    assert [r["call"] for r in facade] == ["direct", "facade", "concurrent"]
    assert all(r["median_wall_us"] > 0 for r in facade)
    sha = [r["side"].split(" ")[0] for r in rows if r["part"] == "sha256"]
    assert sha == (["new", "old", "qemu-io"] if baseline else ["new", "qemu-io"])
    assert [p.name for p in tmp_path.iterdir()] == ["block.json"]


@pytest.mark.interop
@pytest.mark.timeout(300)
def test_qmp_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                              tmp_path: Path) -> None:
    """Both servers start, take every timed call and agree (merges, queries, the stored
    bitmaps after quit); a round trip comes out for each operation and side."""
    out = tmp_path / "qmp.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "qmp_bench.py"), "--quick", "--size", "1G",
         "--bitmaps", "4", "--runs-per-bitmap", "8", "--sessions", "1", "--calls", "3",
         "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True
    ops = [r["operation"] for r in results["results"]]
    assert ops[:3] == ["query-named-block-nodes", "block-dirty-bitmap-add",
                       "block-dirty-bitmap-remove"]
    assert "transaction (6 actions)" in ops and "start-up until QMP listens" in ops
    for r in results["results"]:
        assert all(r["median_us"][side] > 0 for side in ("dirtybits", "qemu")), r
    assert [p.name for p in tmp_path.iterdir()] == ["qmp.json"]


@pytest.mark.interop
@pytest.mark.timeout(300)
def test_nbd_bench_quick_runs_and_checks_pass(qemu_tools: dict[str, str],
                                              tmp_path: Path) -> None:
    """Both servers serve the data, the random reads, the bitmap walk and the pull as
    expected, take the writes (checked images) and the nbdcopy runs; every case has a value
    for both sides."""
    out = tmp_path / "nbd.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "nbd_bench.py"), "--quick", "--size", "8M",
         "--seq-bytes", "16M", "--rand-ops", "100", "--map-size", "4G", "--dirty-runs", "50",
         "--status-passes", "2", "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["ok"] is True
    cases = [r["case"] for r in results["results"]]
    assert cases == [
        "seq read 1M, 1 in flight", "seq read 1M, 4 in flight",
        "random read 4k, 1 in flight", "random read 4k, 8 in flight",
        "seq write 1M, 1 in flight", "seq write 1M, 4 in flight",
        "block status b0, first walk", "block status b0, later walks",
        "pull dirty extents, 16 in flight",
        "nbdcopy data -> null:", "nbdcopy data -> file", "nbdcopy 4G sparse -> null:"]
    for r in results["results"]:
        assert all(r["median"][side] > 0 for side in results["tools"]), r
    assert [p.name for p in tmp_path.iterdir()] == ["nbd.json"]
