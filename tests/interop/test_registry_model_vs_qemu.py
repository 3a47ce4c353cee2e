"""The bitmap registry's state machine (tests/unit/test_registry_model.py), with QEMU asked
whenever the image is closed: at a reopen (when hypothesis draws it) and always at the end.

QEMU must see what the oracle says: ``qemu-img info`` lists exactly the persistent bitmaps
with their granularity and flags (``auto`` when enabled, never ``in-use``), and for each
bitmap (at a reopen, one drawn; at the end, every one) ``qemu-nbd -B NAME`` +
``nbdinfo --map=qemu:dirty-bitmap:NAME`` reports exactly the oracle's dirty granules.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hypothesis import note, settings
from hypothesis import strategies as st

from peers import nbd_map, qemu_bitmaps

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))  # the machine itself
from test_registry_model import (
    MODEL_SETTINGS,
    RegistryModel,
    run_model,
    runs_to_granules,
)

QEMU_SETTINGS = settings(
    MODEL_SETTINGS,
    max_examples=int(os.environ.get("DIRTYBITS_REGISTRY_QEMU_EXAMPLES", "12")),
    stateful_step_count=30,
)


class RegistryModelVsQemu(RegistryModel):
    def closed(self, data: st.DataObject | None) -> None:
        if data is not None and not data.draw(st.booleans(), label="ask QEMU"):
            return
        want = {n: bm for n, bm in self.bms.items() if bm.persistent}
        path = Path(self.path)
        got = {b["name"]: (b["granularity"], sorted(b["flags"]))  # type: ignore[index]
               for b in qemu_bitmaps(path)}
        expect = {n: (bm.granularity, ["auto"] if bm.enabled else [])
                  for n, bm in want.items()}
        assert got == expect, ("qemu-img info bitmaps", got, expect)
        if data is None:
            names = list(want)
        elif want:
            names = [data.draw(st.sampled_from(list(want)), label="bitmap QEMU exports")]
        else:
            names = []
        for name in names:
            bm = want[name]
            extents = json.loads(nbd_map(path, name, "--json"))
            dirty = [(e["offset"], e["length"]) for e in extents if e["type"] == 1]
            granules = runs_to_granules(dirty, bm.granularity)
            note(f"qemu-nbd -B {name}: {len(dirty)} dirty extents")
            assert granules == bm.granules, (
                "qemu-nbd -B", name, "only QEMU", sorted(granules - bm.granules)[:10],
                "only the oracle", sorted(bm.granules - granules)[:10])
            assert sum(n for _, n in dirty) == sum(
                min((g + 1) * bm.granularity, self.size) - g * bm.granularity
                for g in bm.granules), ("qemu-nbd -B", name, "dirty bytes")


def test_registry_model_vs_qemu(qemu_tools: dict[str, str], tmp_path: Path) -> None:
    run_model(RegistryModelVsQemu, tmp_path, QEMU_SETTINGS)
