"""The bitmap registry of one node against a set-of-granules oracle (hypothesis, rule based).

Every example creates one small qcow2 (a cluster size and a disk size drawn once, one to
three persistent bitmaps stored before the first open) and runs a random interleaving of
guest requests and bitmap operations on ``dirtybits.open``'s node:

* write / write_zeroes (unmap or not) / discard: every *enabled* bitmap gets every granule the
  request touches (QEMU's ``bdrv_set_dirty`` on the whole request, discards included);
* add (persistent or not, disabled or not, any granularity or the default), remove, clear,
  enable, disable, merge (granularities may differ: each dirty source granule, clamped to the
  disk, marks every target granule it overlaps, QEMU's sparse ``hbitmap_merge``), copy (the
  source's granularity and bits; enabled as the source unless told), rename;
* transactions of 1 to 4 of those actions (rename too), each seeing the ones before it: all
  commit, or the first refusal is raised and nothing changes;
* checkpoint, flush, and reopen (close + open: transient bitmaps are gone, persistent ones
  keep their bits and their enabled state).

Names come from a small pool. One rule tries every operation on a missing name (or adds,
copies, renames onto a taken one): it must raise ``BitmapOperationError`` with QEMU's text
and change nothing, in memory or on disk (no bitmap newly in_use).

Checked after every step: the node's names (oldest first), ``query`` (newest first),
``info`` (granularity, persistence, recording, status, disk state), ``extents`` and ``count``
of every bitmap; and the file itself, read with no engine state: its persistent bitmaps are
the oracle's (names in order, granularity, the auto flag), ``in_use`` exactly on the enabled
persistent ones written since the last operation or checkpoint (each operation ends with a
checkpoint), and every bitmap not in_use holds the oracle's granules. After every
reopen and at the end (closed) every persistent bitmap is clean and equal to the oracle.

``tests/interop/test_registry_model_vs_qemu.py`` runs the same machine and asks QEMU
(``qemu-img info`` and ``qemu-nbd -B`` + ``nbdinfo --map``) whenever the image is closed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import dirtybits
from dirtybits.block.checkpoint import CheckpointPolicy
from dirtybits.block.node import BlockNode
from dirtybits.block.qcow2_bitmaps import BitmapOperationError, Qcow2BitmapStore
from dirtybits.block.registry import BitmapRegistry, BitmapStatus, DiskState
from dirtybits.qcow2.image import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20
NO_TIMERS = CheckpointPolicy(interval=None, idle=None, threshold_bits=None)
NAMES = ("a", "b", "c", "d", "e")
GRANULARITIES = (None, 512, 4 * KiB, 64 * KiB, MiB)  # None: the node's default
# the serialized bits are stored (and tracked for checkpoints) in chunks of one cluster: with
# 512-byte clusters a bitmap of 512-byte granules spans four chunks and a table of four entries
CLUSTER_SIZES = (512, 4 * KiB, 64 * KiB)
# a whole number of 1 MiB granules, and two sizes whose last granule is partial for most
# granularities (a qcow2 size is a multiple of 512)
DISK_SIZES = (8 * MiB, 8 * MiB - 3 * 512, 6 * MiB + 5 * 4 * KiB + 512)

_STRICT = os.environ.get("DIRTYBITS_REQUIRE_INTEROP") == "1" or os.environ.get("CI") == "true"

# CI: derandomized, so a red run is reproducible. test_machine_finds_planted_bug fails if the
# budget drops below what finds the planted bugs. 100 examples: alone, 10 find every plant,
# but after some other test files in the same process (tests/unit's first nine) 60 did not
# find the dense merge (why the draws differ there is not understood yet).
MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("DIRTYBITS_REGISTRY_MODEL_EXAMPLES", "100")),
    stateful_step_count=50,
    deadline=None,
    derandomize=_STRICT,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


def default_granularity(cluster_size: int) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity for a qcow2 node."""
    return min(max(cluster_size, 4 * KiB), 64 * KiB)


def touched(offset: int, length: int, gran: int) -> set[int]:
    """The granules ``[offset, offset+length)`` touches (nothing for an empty range)."""
    if length <= 0:
        return set()
    return set(range(offset // gran, (offset + length - 1) // gran + 1))


def runs_to_granules(runs: list[tuple[int, int]], gran: int) -> set[int]:
    out: set[int] = set()
    for off, n in runs:
        out |= touched(off, n, gran)
    return out


def granules_to_runs(granules: set[int], gran: int, size: int) -> list[tuple[int, int]]:
    """The dirty runs ``extents`` reports: granule runs merged, clamped to the disk."""
    runs: list[tuple[int, int]] = []
    for g in sorted(granules):
        start, end = g * gran, min((g + 1) * gran, size)
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end - runs[-1][0])
        else:
            runs.append((start, end - start))
    return runs


@dataclass
class Bitmap:
    """The oracle of one bitmap."""

    granularity: int
    persistent: bool
    enabled: bool
    granules: set[int] = field(default_factory=set)


def step(fn: Callable[..., None]) -> Callable[..., None]:
    """Teardown verifies the file only when the last step (or invariant) finished, else
    the failure reported would be teardown's, not the step's."""

    @functools.wraps(fn)
    def wrapper(self: RegistryModel, *args: Any, **kwargs: Any) -> None:
        self.ok = False
        fn(self, *args, **kwargs)
        self.ok = True

    return wrapper


@st.composite
def ranges(draw: st.DrawFn, size: int) -> tuple[int, int]:
    """(offset, length) inside the disk: granule-aligned and byte-granular edges, one byte,
    a few granules, a few MiB, ranges reaching the end of the disk."""
    align = draw(st.sampled_from([1, 512, 4 * KiB, 64 * KiB, MiB]))
    start = draw(st.integers(0, (size - 1) // align)) * align
    if draw(st.booleans()):
        start = min(size - 1, start + draw(st.integers(0, 4 * KiB)))
    to_end = size - start
    length = draw(st.one_of(
        st.just(1), st.integers(1, 8 * KiB), st.integers(1, 3 * MiB), st.just(to_end),
        st.integers(1, 4).map(lambda k: k * align)))
    return start, max(1, min(length, to_end))


class RegistryModel(RuleBasedStateMachine):
    base_dir: ClassVar[Path]

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(dir=self.base_dir)
        self.path = os.path.join(self.dir, "d.qcow2")
        self.node: BlockNode | None = None
        self.bms: dict[str, Bitmap] = {}  # in the node's order: oldest first
        self.in_use: set[str] = set()  # persistent bitmaps in_use on disk (writes unstored)
        self.size = 0
        self.cluster_size = 0
        self.ok = True

    # ------------------------------------------------------------------ helpers
    @property
    def reg(self) -> BitmapRegistry:
        assert self.node is not None
        return self.node.bitmaps

    def _open(self) -> None:
        node = dirtybits.open(self.path, checkpoint=NO_TIMERS)
        assert isinstance(node, BlockNode)
        self.node = node

    def _refused(self, text: str, fn: Callable[..., object], *args: Any,
                 **kwargs: Any) -> None:
        """The operation fails with QEMU's ``text``; the invariants check nothing changed in
        memory or on disk."""
        event(f"refused {getattr(fn, '__name__', fn)}")
        with pytest.raises(BitmapOperationError) as err:
            fn(*args, **kwargs)
        assert str(err.value) == text, (str(err.value), text)
        # no bitmap newly in_use (a crash would lose it); a refused transaction whose
        # earlier actions had marked one checkpoints, which may store the others too
        flags = self._disk_in_use()
        assert flags <= self.in_use, ("in_use after a refusal", flags, self.in_use)
        self.in_use = flags

    def _disk_in_use(self) -> set[str]:
        with Qcow2Image.open(self.path, readonly=True, force_share=True) as img:
            return {sb.name for sb in Qcow2BitmapStore(img).bitmaps if sb.entry.in_use}

    def _done(self) -> None:
        """An operation succeeded: it ended with a checkpoint."""
        self.in_use = set()

    def _mark(self, offset: int, length: int) -> None:
        for name, bm in self.bms.items():
            if bm.enabled:
                bm.granules |= touched(offset, length, bm.granularity)
                if bm.persistent:
                    self.in_use.add(name)

    # ------------------------------------------------------------------ setup
    @initialize(cluster_size=st.sampled_from(CLUSTER_SIZES), size=st.sampled_from(DISK_SIZES),
                stored=st.lists(st.tuples(st.sampled_from(GRANULARITIES[1:]), st.booleans()),
                                min_size=1, max_size=3))
    def create(self, cluster_size: int, size: int, stored: list[tuple[int, bool]]) -> None:
        """The image, with one to three persistent bitmaps stored before the first open
        (bitmaps found at open are grouped per granularity, not materialized)."""
        note(f"cluster size {cluster_size}, disk size {size}, stored bitmaps {stored}")
        self.cluster_size, self.size = cluster_size, size
        Qcow2Image.create(self.path, size, cluster_size=cluster_size)
        with Qcow2Image.open(self.path, keep_bitmaps=True) as img:
            store = Qcow2BitmapStore(img)
            for name, (gran, enabled) in zip(NAMES, stored, strict=False):
                store.add(name, gran, disabled=not enabled)
                self.bms[name] = Bitmap(gran, True, enabled)
        self._open()

    # ------------------------------------------------------------------ guest requests
    @rule(data=st.data())
    @step
    def write(self, data: st.DataObject) -> None:
        off, n = data.draw(ranges(self.size), label="range")
        assert self.node is not None
        self.node.write(off, b"\xa5" * n)
        self._mark(off, n)

    @rule(data=st.data(), unmap=st.booleans())
    @step
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        off, n = data.draw(ranges(self.size), label="range")
        assert self.node is not None
        self.node.write_zeroes(off, n, unmap=unmap)
        self._mark(off, n)

    @rule(data=st.data())
    @step
    def discard(self, data: st.DataObject) -> None:
        off, n = data.draw(ranges(self.size), label="range")
        assert self.node is not None
        self.node.discard(off, n)
        self._mark(off, n)

    # ------------------------------------------------------------------ bitmap operations
    def _pick(self, data: st.DataObject, label: str, *, present: bool = True) -> str:
        """A name of an existing bitmap (``present``), or a free name of the pool."""
        pool = [n for n in NAMES if (n in self.bms) == present]
        return data.draw(st.sampled_from(pool), label=label)

    def _has(self) -> bool:
        return bool(self.bms)

    def _has_room(self) -> bool:
        return len(self.bms) < len(NAMES)

    @precondition(_has_room)
    @rule(data=st.data(), granularity=st.sampled_from(GRANULARITIES),
          persistent=st.booleans(), disabled=st.booleans())
    @step
    def add(self, data: st.DataObject, granularity: int | None, persistent: bool,
            disabled: bool) -> None:
        name = self._pick(data, "name", present=False)
        self.reg.add(name, granularity, persistent=persistent, disabled=disabled)
        gran = granularity if granularity is not None else default_granularity(
            self.cluster_size)
        self.bms[name] = Bitmap(gran, persistent, not disabled)
        self._done()

    @precondition(_has)
    @rule(data=st.data())
    @step
    def remove(self, data: st.DataObject) -> None:
        name = self._pick(data, "name")
        self.reg.remove(name)
        del self.bms[name]
        self._done()

    @precondition(_has)
    @rule(data=st.data())
    @step
    def clear(self, data: st.DataObject) -> None:
        name = self._pick(data, "name")
        self.reg.clear(name)
        self.bms[name].granules = set()
        self._done()

    @precondition(_has)
    @rule(data=st.data(), on=st.booleans())
    @step
    def enable_or_disable(self, data: st.DataObject, on: bool) -> None:
        name = self._pick(data, "name")
        (self.reg.enable if on else self.reg.disable)(name)
        self.bms[name].enabled = on
        self._done()

    @precondition(_has)
    @rule(data=st.data())
    @step
    def merge(self, data: st.DataObject) -> None:
        """Mostly into a target the merge changes (most bitmaps record the same writes, so
        a random merge often changes nothing)."""
        sources = data.draw(st.lists(st.sampled_from(list(self.bms)), min_size=1, max_size=3),
                            label="sources")
        changed = [n for n in self.bms if self._merged(self.bms, n, sources)
                   - self.bms[n].granules]
        if changed and data.draw(st.integers(0, 3), label="a target it changes"):
            target = data.draw(st.sampled_from(changed), label="target")
        else:
            target = self._pick(data, "target")
        self.reg.merge(target, sources)
        self._merge_into(self.bms, target, sources)
        self._done()

    def _merge_into(self, bms: dict[str, Bitmap], target: str, sources: list[str]) -> None:
        bms[target].granules |= self._merged(bms, target, sources)

    def _merged(self, bms: dict[str, Bitmap], target: str, sources: list[str]) -> set[int]:
        """QEMU's merge: every dirty source granule (clamped to the disk) marks each target
        granule it overlaps."""
        dst = bms[target]
        add: set[int] = set()
        for s in sources:
            src = bms[s]
            for g in src.granules:
                start = g * src.granularity
                add |= touched(start, min(start + src.granularity, self.size) - start,
                               dst.granularity)
        return add

    @precondition(lambda self: self._has() and self._has_room())
    @rule(data=st.data(), persistent=st.booleans(),
          disabled=st.sampled_from([None, False, True]))
    @step
    def copy(self, data: st.DataObject, persistent: bool, disabled: bool | None) -> None:
        name = self._pick(data, "name")
        new = self._pick(data, "new name", present=False)
        self.reg.copy(name, new, persistent=persistent, disabled=disabled)
        src = self.bms[name]
        self.bms[new] = Bitmap(src.granularity, persistent,
                               src.enabled if disabled is None else not disabled,
                               set(src.granules))
        self._done()

    @precondition(lambda self: self._has() and self._has_room())
    @rule(data=st.data())
    @step
    def rename(self, data: st.DataObject) -> None:
        name = self._pick(data, "name")
        new = self._pick(data, "new name", present=False)
        self.reg.rename(name, new)
        self.bms = {new if n == name else n: bm for n, bm in self.bms.items()}
        self._done()

    @rule(data=st.data())
    @step
    def transaction(self, data: st.DataObject) -> None:
        """1 to 4 transaction actions (QEMU's add, remove, clear, enable, disable, merge, and
        rename), each seeing the ones before it: all commit, or the first refusal is raised
        (QEMU's text) and nothing changes. A bitmap removed earlier in the transaction is
        busy until the commit (QEMU: "currently in use"), and its name is still taken."""
        reg = self.reg
        model = {n: Bitmap(bm.granularity, bm.persistent, bm.enabled, set(bm.granules))
                 for n, bm in self.bms.items()}
        removed: set[str] = set()
        actions = []
        err: str | None = None

        def name(label: str) -> str:
            pool = [n for n in model if n not in removed]
            if pool and data.draw(st.integers(0, 3), label=f"{label} exists"):
                return data.draw(st.sampled_from(pool), label=label)
            return data.draw(st.sampled_from(NAMES), label=label)

        def usable(n: str) -> str | None:
            if n not in model:
                return f"Dirty bitmap '{n}' not found"
            if n in removed:
                return (f"Bitmap '{n}' is currently in use by another operation and cannot "
                        "be used")
            return None

        for _ in range(data.draw(st.integers(1, 4), label="actions")):
            kind = data.draw(st.sampled_from(
                ["add", "merge", "clear", "enable", "disable", "remove", "rename"]),
                label="action")
            if kind == "add":
                n = data.draw(st.sampled_from(NAMES), label="name")
                gran = data.draw(st.sampled_from(GRANULARITIES), label="granularity")
                persistent = data.draw(st.booleans(), label="persistent")
                disabled = data.draw(st.booleans(), label="disabled")
                actions.append(reg.action_add(n, gran, persistent=persistent,
                                              disabled=disabled))
                if err is None:
                    if n in model:
                        err = f"Bitmap already exists: {n}"
                    else:
                        model[n] = Bitmap(gran or default_granularity(self.cluster_size),
                                          persistent, not disabled)
            elif kind == "merge":
                target = name("target")
                sources = [name("source")
                           for _ in range(data.draw(st.integers(1, 3), label="sources"))]
                actions.append(reg.action_merge(target, sources))
                if err is None:
                    for n in (target, *sources):
                        if (err := usable(n)) is not None:
                            break
                    else:
                        self._merge_into(model, target, sources)
            elif kind == "rename":
                n, new = name("name"), data.draw(st.sampled_from(NAMES), label="new name")
                actions.append(reg.action_rename(n, new))
                if err is None and (err := usable(n)) is None:
                    if new in model:
                        err = f"Bitmap already exists: {new}"
                    else:
                        model = {new if k == n else k: bm for k, bm in model.items()}
            else:
                n = name("name")
                actions.append(reg.action_remove(n) if kind == "remove" else
                               reg.action_clear(n) if kind == "clear" else
                               reg.action_enable(n, kind == "enable"))
                if err is None and (err := usable(n)) is None:
                    if kind == "remove":
                        removed.add(n)
                    elif kind == "clear":
                        model[n].granules = set()
                    else:
                        model[n].enabled = kind == "enable"
        note(f"transaction of {[a.name for a in actions]}: {err or 'commits'}")
        if err is not None:
            self._refused(err, reg.transaction, actions)
            return
        reg.transaction(actions)
        self.bms = {n: bm for n, bm in model.items() if n not in removed}
        self._done()

    @rule(data=st.data(), op=st.sampled_from(
        ["add", "remove", "clear", "enable", "disable", "merge-target", "merge-source",
         "copy-source", "copy-onto", "rename-source", "rename-onto"]))
    @step
    def refused(self, data: st.DataObject, op: str) -> None:
        """An operation naming a missing bitmap, or adding (copying, renaming) onto an
        existing name: QEMU's text, and nothing changes (the invariants check)."""
        reg = self.reg
        missing = data.draw(st.sampled_from(
            [n for n in (*NAMES, "nope") if n not in self.bms]), label="missing")
        lost = f"Dirty bitmap '{missing}' not found"
        free = next(n for n in (*NAMES, "nope", "nope2") if n not in self.bms and n != missing)
        if op in ("remove", "clear", "enable", "disable"):
            self._refused(lost, getattr(reg, op), missing)
        elif op == "merge-target":
            self._refused(lost, reg.merge, missing, list(self.bms)[:1] or [missing])
        elif op == "copy-source":
            self._refused(lost, reg.copy, missing, free)
        elif op == "rename-source":
            self._refused(lost, reg.rename, missing, free)
        elif not self.bms:
            return
        elif op == "merge-source":
            sources = data.draw(st.permutations([*list(self.bms)[:2], missing]),
                                label="sources")
            self._refused(lost, reg.merge, self._pick(data, "target"), sources)
        else:
            taken = self._pick(data, "existing")
            exists = f"Bitmap already exists: {taken}"
            src = self._pick(data, "source")
            persistent = data.draw(st.booleans(), label="persistent")
            if op == "add":
                gran = data.draw(st.sampled_from(GRANULARITIES), label="granularity")
                self._refused(exists, reg.add, taken, gran, persistent=persistent)
            elif op == "copy-onto":
                self._refused(exists, reg.copy, src, taken, persistent=persistent)
            else:  # onto another bitmap, or itself
                self._refused(exists, reg.rename, src, taken)

    # ------------------------------------------------------------------ persistence
    @rule(flush=st.booleans())
    @step
    def checkpoint(self, flush: bool) -> None:
        assert self.node is not None
        if flush:
            self.node.flush()
        else:
            self.node.checkpoint()
        self._done()

    @rule(data=st.data())
    @step
    def reopen(self, data: st.DataObject) -> None:
        assert self.node is not None
        self.node.close()
        self.node = None
        self.in_use = set()
        self.bms = {n: bm for n, bm in self.bms.items() if bm.persistent}
        self._check_disk("after close")
        self.closed(data)
        self._open()

    def closed(self, data: st.DataObject | None) -> None:
        """The image is closed (the QEMU twin asks QEMU here)."""

    # ------------------------------------------------------------------ checks
    @invariant()
    @step
    def node_matches(self) -> None:
        if self.node is None:
            return
        reg = self.reg
        assert reg.names() == list(self.bms), ("names", reg.names(), list(self.bms))
        assert [i.name for i in reg.query()] == list(reversed(self.bms)), "query order"
        for name, bm in self.bms.items():
            info = reg.info(name)
            want_disk = (DiskState.NONE if not bm.persistent else
                         DiskState.OPEN if name in self.in_use else DiskState.CLEAN)
            got = (info.granularity, info.persistent, info.recording, info.status,
                   info.disk_state, info.busy, info.inconsistent)
            want = (bm.granularity, bm.persistent, bm.enabled,
                    BitmapStatus.ACTIVE if bm.enabled else BitmapStatus.DISABLED,
                    want_disk, False, False)
            assert got == want, (name, got, want)
            runs = reg.extents(name)
            assert runs == granules_to_runs(bm.granules, bm.granularity, self.size), (
                name, "extents", sorted(runs_to_granules(runs, bm.granularity)
                                        ^ bm.granules)[:10])
            assert reg.count(name) == info.count == len(bm.granules) * bm.granularity, name
        self._check_disk("image open")

    def _check_disk(self, when: str) -> None:
        """The file, read with no engine state, holds what the oracle says."""
        want = {n: bm for n, bm in self.bms.items() if bm.persistent}
        with Qcow2Image.open(self.path, readonly=True, force_share=True) as img:
            store = Qcow2BitmapStore(img)
            got = [sb.name for sb in store.bitmaps]
            assert got == list(want), (when, "stored names", got, list(want))
            for sb in store.bitmaps:
                bm = want[sb.name]
                assert not sb.problems, (when, sb.name, sb.problems)
                flags = (sb.entry.granularity, sb.entry.auto, sb.entry.in_use)
                expect = (bm.granularity, bm.enabled, sb.name in self.in_use)
                assert flags == expect, (when, sb.name, "(granularity, auto, in_use)", flags,
                                         expect)
                if sb.entry.in_use:
                    continue  # its stored bits are not complete, and not meant to be
                loaded = store.load(sb.name)
                stored = runs_to_granules(list(loaded.dirty_extents(0, loaded.size)),
                                          bm.granularity)
                assert stored == bm.granules, (
                    when, sb.name, "stored granules differ: only stored",
                    sorted(stored - bm.granules)[:10], "only in the oracle",
                    sorted(bm.granules - stored)[:10])

    def teardown(self) -> None:
        try:
            if self.ok and self.node is not None:
                self.node.close()
                self.node = None
                self.in_use = set()
                self.bms = {n: bm for n, bm in self.bms.items() if bm.persistent}
                self._check_disk("at the end, closed")
                self.closed(None)
        finally:
            if self.node is not None:
                with contextlib.suppress(Exception):
                    self.node.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def run_model(machine: type[RegistryModel], tmp_path: Path, budget: settings) -> None:
    cls = type(machine.__name__, (machine,), {"base_dir": tmp_path})
    run_state_machine_as_test(cls, settings=budget)


def test_registry_matches_model(tmp_path: Path) -> None:
    run_model(RegistryModel, tmp_path, MODEL_SETTINGS)


# --------------------------------------------------------------------------- planted bugs
# Proof that the machine, at its budget, finds registry bugs: each plant breaks the registry
# the way a real bug would, and the machine (derandomized, as in CI) must fail.
def _clear_not_stored(mp: pytest.MonkeyPatch) -> None:
    """A clear empties the live bits but the checkpoint never hears of it (the changed
    chunks are not marked), so the stored copy keeps the old bits."""
    orig = BitmapRegistry.action_clear

    def action_clear(self: BitmapRegistry, name: str) -> Any:
        act = orig(self, name)
        inner = act.prepare

        def prepare() -> None:
            inner()
            lb = self.get(name)
            if lb.cursor is not None:
                lb.cursor.take()

        act.prepare = prepare
        return act

    mp.setattr(BitmapRegistry, "action_clear", action_clear)


def _merge_not_stored(mp: pytest.MonkeyPatch) -> None:
    """A merge into a persistent bitmap neither stores the clean target whole at commit nor
    sets in_use on one already open (so the checkpoint after it writes nothing)."""
    orig = BitmapRegistry.action_merge

    def action_merge(self: BitmapRegistry, target: str, sources: Any) -> Any:
        act = orig(self, target, sources)
        inner = act.prepare

        def prepare() -> None:
            real = self._ensure_marked
            self._ensure_marked = lambda lb: None  # type: ignore[method-assign]
            try:
                inner()
            finally:
                self._ensure_marked = real  # type: ignore[method-assign]

        act.prepare = prepare
        act.commit = lambda: None
        return act

    mp.setattr(BitmapRegistry, "action_merge", action_merge)


def _disable_not_stored(mp: pytest.MonkeyPatch) -> None:
    """Disabling a persistent bitmap leaves the auto flag on disk (it records again after a
    reopen)."""
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore as Store

    orig = Store.set_enabled

    def set_enabled(self: Store, name: str, on: bool) -> Any:
        return orig(self, name, True)

    mp.setattr(Store, "set_enabled", set_enabled)


def _sparse_merge_drops_partial(mp: pytest.MonkeyPatch) -> None:
    """A merge from a finer bitmap marks a coarse target granule only when the source
    covers it whole (a dense, not QEMU's sparse, merge)."""
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

    orig = DirtyBitmap.merge_from

    def merge_from(self: DirtyBitmap, other: DirtyBitmap) -> None:
        if other.granularity >= self.granularity:
            orig(self, other)
            return
        g = self.granularity
        for start, n in list(other.dirty_extents(0, other.size)):
            first, end = -(-start // g) * g, (start + n) // g * g
            if end > first:
                self.set(first, end - first)

    mp.setattr(DirtyBitmap, "merge_from", merge_from)


PLANTS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "clear-not-stored": (_clear_not_stored, r"stored granules differ"),
    "merge-not-stored": (_merge_not_stored, r"stored granules differ|in_use"),
    "disable-not-stored": (_disable_not_stored, r"granularity, auto, in_use|recording|names"),
    "dense-merge": (_sparse_merge_drops_partial, r"extents|stored granules differ"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_machine_finds_planted_bug(plant: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    apply, says = PLANTS[plant]
    apply(monkeypatch)
    # the budget and draws of CI; no shrinking (the failure is expected, its minimal form is
    # not needed), no database (a stored failure would be replayed instead of searched for)
    budget = settings(MODEL_SETTINGS, derandomize=True, database=None,
                      phases=[Phase.generate], print_blob=False)
    with pytest.raises(AssertionError) as found:
        run_model(RegistryModel, tmp_path, budget)
    assert re.search(says, str(found.value)), found.value


# --------------------------------------------------------------------------- registry bugs found
# Fixed in the registry. The machine's transaction rule found the first two; the third came
# up while fixing the first (the rule can reach it, but rarely: it takes a rename of an
# in_use bitmap between a clear and a refusal), so it is pinned here.
def _image_with(tmp_path: Path, *names: str) -> str:
    path = str(tmp_path / "d.qcow2")
    Qcow2Image.create(path, 8 * MiB, cluster_size=64 * KiB)
    with Qcow2Image.open(path, keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        for n in names:
            store.add(n, 64 * KiB)
    return path


def _flags(path: str) -> dict[str, bool]:
    with Qcow2Image.open(path, readonly=True, force_share=True) as img:
        return {sb.name: sb.entry.in_use for sb in Qcow2BitmapStore(img).bitmaps}


def _stored(path: str, name: str) -> list[tuple[int, int]]:
    with Qcow2Image.open(path, readonly=True, force_share=True) as img:
        bm = Qcow2BitmapStore(img).load(name)
        return list(bm.dirty_extents(0, bm.size))


def test_refused_transaction_leaves_no_bitmap_in_use(tmp_path: Path) -> None:
    """Was: the clear marked 'a' in_use, the second action failed, the clear was undone in
    memory, and 'a' stayed in_use on disk until the next checkpoint (with no timers: until
    close), so a crash then lost a bitmap that nothing had changed."""
    path = _image_with(tmp_path, "a")
    with dirtybits.open(path, checkpoint=NO_TIMERS) as node:
        node.write(0, b"x")
        node.checkpoint()
        reg = node.bitmaps
        with pytest.raises(BitmapOperationError, match="Dirty bitmap 'nope' not found"):
            reg.transaction([reg.action_clear("a"), reg.action_clear("nope")])
        assert _flags(path) == {"a": False}
        assert reg.info("a").disk_state is DiskState.CLEAN
        assert reg.extents("a") == _stored(path, "a") == [(0, 64 * KiB)]


def test_removed_in_a_transaction_is_busy_not_missing(tmp_path: Path) -> None:
    """QEMU sets a bitmap removed in a transaction busy until the commit: a later action on
    it fails with "currently in use" (was: "not found"), and its name is still taken."""
    path = _image_with(tmp_path, "a")
    with dirtybits.open(path, checkpoint=NO_TIMERS) as node:
        reg = node.bitmaps
        busy = "Bitmap 'a' is currently in use by another operation and cannot be used"
        for second in (reg.action_clear("a"), reg.action_remove("a"),
                       reg.action_merge("a", ["a"]), reg.action_enable("a", False)):
            with pytest.raises(BitmapOperationError) as err:
                reg.transaction([reg.action_remove("a"), second])
            assert str(err.value) == busy
        with pytest.raises(BitmapOperationError, match=r"^Bitmap already exists: a$"):
            reg.transaction([reg.action_remove("a"), reg.action_add("a")])
        assert reg.names() == ["a"] and reg.info("a").recording


def test_abort_after_a_checkpoint_inside_the_transaction_is_stored(tmp_path: Path) -> None:
    """Was: a rename of an in_use bitmap checkpoints inside the transaction (the store renames
    only bitmaps not in_use), which stored the clear of 'a' prepared before it and cleared its
    in_use; a later action failed and the clear was undone in memory only (restoring bits
    did not mark the bitmap in_use, and a checkpoint stores only marked ones). The file kept
    'a' empty and consistent while the node (and QEMU's expectation) had its bits: after a
    reopen, 'a' missed a write."""
    path = _image_with(tmp_path, "a", "b")
    with dirtybits.open(path, checkpoint=NO_TIMERS) as node:
        reg = node.bitmaps
        node.write(0, b"x")
        node.checkpoint()
        reg.disable("a")
        node.write(64 * KiB, b"x")  # 'b' in_use
        with pytest.raises(BitmapOperationError, match="Dirty bitmap 'nope' not found"):
            reg.transaction([reg.action_clear("a"), reg.action_rename("b", "c"),
                             reg.action_clear("nope")])
        assert reg.extents("a") == [(0, 64 * KiB)]
        assert _flags(path) == {"a": False, "b": False}
        assert _stored(path, "a") == [(0, 64 * KiB)]
    with dirtybits.open(path, checkpoint=NO_TIMERS) as node:
        assert node.bitmaps.extents("a") == [(0, 64 * KiB)]
        assert node.bitmaps.extents("b") == [(0, 2 * 64 * KiB)]
