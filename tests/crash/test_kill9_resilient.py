"""Kill -9 with resilient mode on, then a tracked reopen that must recover (harness.py).

The templates have the write-intent map on (1 MiB regions with a map already valid and marked
by an earlier session; 64 KiB regions with a fresh map and a bitmap QEMU left in_use before the
map existed). Each kill is first judged as in test_kill9 (``qemu-img check``: no corruption;
consistent bitmaps cover every changed granule; the disabled one untouched); then the image is
opened with ``dirtybits.open`` and closed, with no writes, and:

- every enabled bitmap is now consistent and covers every granule whose data differs from the
  pre-image (zero misses), exactly the bitmaps the crash left in_use were recovered, the
  disabled bitmap is unchanged and the pre-existing inconsistent one is still in_use (the map
  never vouches for writes it did not see);
- in the ``qemu`` runs, ``qemu-io`` writes to the image between the kill and the reopen: the map
  is then invalid, nothing is recovered, what the crash left in_use stays in_use, and the
  consistent bitmaps (QEMU tracked its write in them) miss neither QEMU's write nor ours.

Environment: ``DIRTYBITS_CRASH_SEED`` (default: random, printed),
``DIRTYBITS_CRASH_RESILIENT_KILLS`` (default 150), ``DIRTYBITS_CRASH_QEMU_KILLS`` (default 25),
``DIRTYBITS_CRASH_WORKERS`` (default 2). A failing kill prints the command that replays it
(``python tests/crash/harness.py replay SEED --resilient [--qemu]``).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness

KILLS = int(os.environ.get("DIRTYBITS_CRASH_RESILIENT_KILLS", "150"))
QEMU_KILLS = int(os.environ.get("DIRTYBITS_CRASH_QEMU_KILLS", "25"))
WORKERS = int(os.environ.get("DIRTYBITS_CRASH_WORKERS", "2"))


@pytest.mark.interop
def test_kill9_resilient_reopen_recovers_every_bitmap_as_a_superset(
        qemu_tools: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("DIRTYBITS_CRASH_SEED") or random.SystemRandom().getrandbits(32))
    totals, elapsed = harness.run(KILLS, seed, workers=WORKERS, scratch=tmp_path,
                                  resilient=True, qemu_count=QEMU_KILLS)
    report = [f"resilient crash seed {seed} (DIRTYBITS_CRASH_SEED={seed} replays this run): "
              f"{totals.kills} kills in {elapsed:.1f} s", *totals.lines()]
    for f in totals.failures[:10]:
        report.append(f"  FAILED kill seed {f['seed']} ({f['mode']}, {f['template']}, "
                      f"{f['events']}): {f['problems']}\n    replay: "
                      f"{harness.replay_command(f)}")
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert not totals.failures, "\n".join(report)
    closes = KILLS // harness.CLOSE_EVERY
    assert totals.kills == KILLS + QEMU_KILLS
    assert totals.closed == closes
    # at the kill: nothing consistent misses a write
    assert totals.misses == 0
    assert totals.quiet_kills > 0 and totals.quiet_consistent == totals.quiet_kills
    # after the reopen: every enabled bitmap consistent, zero misses, exactly the in_use
    # ones recovered (and the harness really left some in_use)
    assert totals.reopened == KILLS + closes
    assert totals.after_inconsistent == 0 and totals.after_misses == 0
    assert totals.after_consistent == totals.after_enabled > 0
    assert totals.recovered == totals.crashed_in_use > 0
    # a QEMU write in between: the map is not trusted
    assert totals.qemu_runs == QEMU_KILLS
    assert totals.qemu_stayed_in_use == totals.qemu_crashed_in_use
    assert totals.qemu_crashed_in_use > 0 or QEMU_KILLS < 5
    assert totals.qemu_after_misses == 0
    assert totals.qemu_checked >= (KILLS + QEMU_KILLS) // harness.QEMU_SAMPLE_EVERY
