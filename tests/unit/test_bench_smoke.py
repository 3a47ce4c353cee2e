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
