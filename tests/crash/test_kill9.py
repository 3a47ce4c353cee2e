"""Kill -9 at random moments while a child writes through the block layer (harness.py).

Every kill must leave an image ``qemu-img check`` finds uncorrupted (leaks allowed), bitmaps
that are either in_use (inconsistent: allowed, counted) or cover every granule whose data
differs from the pre-image (zero silent misses), a disabled bitmap untouched, and, after a
quiet moment (a checkpoint, then idle) or a clean close, every enabled bitmap consistent. QEMU
agrees on a sample (``qemu-img info`` flags, ``qemu-nbd -B`` + ``nbdinfo --map``).

Environment: ``DIRTYBITS_CRASH_SEED`` (default: random, printed), ``DIRTYBITS_CRASH_KILLS``
(default 120), ``DIRTYBITS_CRASH_WORKERS`` (default 2). A failing kill prints its own seed;
``python tests/crash/harness.py replay SEED`` runs just that one again.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness

KILLS = int(os.environ.get("DIRTYBITS_CRASH_KILLS", "120"))
WORKERS = int(os.environ.get("DIRTYBITS_CRASH_WORKERS", "2"))


@pytest.mark.interop
def test_kill9_leaves_clean_images_and_no_silent_misses(
        qemu_tools: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("DIRTYBITS_CRASH_SEED") or random.SystemRandom().getrandbits(32))
    totals, elapsed = harness.run(KILLS, seed, workers=WORKERS, scratch=tmp_path)
    report = [f"crash seed {seed} (DIRTYBITS_CRASH_SEED={seed} replays this run): "
              f"{totals.kills} kills in {elapsed:.1f} s", *totals.lines()]
    for f in totals.failures[:10]:
        close = " --close" if f["mode"] == "close" else ""
        report.append(f"  FAILED kill seed {f['seed']} ({f['mode']}, {f['template']}, "
                      f"{f['events']}): {f['problems']}\n    replay: python "
                      f"tests/crash/harness.py replay {f['seed']}{close}")
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert not totals.failures, "\n".join(report)
    assert totals.kills == KILLS
    assert totals.misses == 0
    assert totals.closed == KILLS // harness.CLOSE_EVERY
    # the harness really hit both states, and quiet moments
    assert totals.quiet_kills > 0 and totals.quiet_consistent == totals.quiet_kills
    assert totals.consistent > 0 and totals.inconsistent > 0
    assert totals.qemu_checked >= KILLS // harness.QEMU_SAMPLE_EVERY
