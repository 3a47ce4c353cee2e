"""Kill -9 while a child runs the registry's operations on an open node (``regcrash.py``).

The child opens an image with persistent bitmaps and runs the mixed workload of the power-loss
workload "registry" (clears of a never-read and of a materialized bitmap, merges from a
transient and a persistent bitmap, a persistent bitmap added while open, disable/enable, a
persistent copy, a rename, a remove, transactions, successor cycles with reclaim and abdicate,
among writes, write-zeroes, checkpoints and flushes), with no timers or with timed checkpoints
on the block thread between the calls. It reports each step's start and return on a pipe; the
parent SIGKILLs it at the start of a random step (after a random short delay) or at an exact
write or sync of the engine (``faultfs``), then rebuilds the model from the seed and judges
the image as ``regcrash.judge_image`` says: no corruption; every bitmap on disk is one the
model holds (after the steps that returned, or after the one in flight) and every one the
model holds for sure is there; every bitmap that reads consistent covers what the model
requires of it (completed requests it recorded, what merges, copies and successors put in it,
and every changed sector it recorded since its baseline). Every tenth run closes the node
first: then every bitmap must be consistent.

Environment: ``DIRTYBITS_CRASH_SEED`` (default: random, printed), ``DIRTYBITS_REGCRASH_KILLS``
(default 120), ``DIRTYBITS_CRASH_WORKERS`` (default 2). A failing kill prints the command that
replays it (``python tests/crash/regcrash.py replay SEED``).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import regcrash

KILLS = int(os.environ.get("DIRTYBITS_REGCRASH_KILLS", "120"))
WORKERS = int(os.environ.get("DIRTYBITS_CRASH_WORKERS", "2"))


@pytest.mark.interop
def test_kill9_during_registry_operations(qemu_tools: dict[str, str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("DIRTYBITS_CRASH_SEED") or random.SystemRandom().getrandbits(32))
    totals, elapsed = regcrash.run(KILLS, seed, workers=WORKERS, scratch=tmp_path)
    report = [f"registry crash seed {seed} (DIRTYBITS_CRASH_SEED={seed} replays this run): "
              f"{KILLS} runs in {elapsed:.1f} s", *totals.lines()]
    report += [f"  FAILED {regcrash.failure_line(f)}" for f in totals.failures[:10]]
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert not totals.failures, "\n".join(report)
    assert totals.kills == KILLS
    closes = len(range(0, KILLS, regcrash.CLOSE_EVERY))
    assert totals.quiet >= closes
    # both outcomes were seen, and kills landed inside registry operations
    assert totals.consistent > 0 and totals.inconsistent > 0
    assert sum(totals.in_flight_ops.values()) >= KILLS // 10, totals.in_flight_ops
