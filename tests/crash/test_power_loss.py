"""Power loss (only what was synced survives), judged over crash states built from a trace of
every write and sync (``powerloss.py``): tracking, checkpoints, ``bitmaps=no``, resilient mode,
recovery from a backup, raw drives with a bitmap container, compressed writes, internal
snapshots (create, delete and apply among copy-on-write writes, judged by ``snapjudge.py``),
and the bitmap registry's operations on an open node (``regcrash.py``: clear, merge, add,
disable/enable, copy, rename, remove, transactions, successors; judged per bitmap against a
model of what each must hold after the operations that had returned).

- every path: the crash states (subsets, reorderings and 512-byte tears of the writes after
  the last sync) show no corruption, no silent miss, no lost flushed data, no leak right
  after a flush;
- the test can fail: every sync site the paths use, removed in turn (its syncs recorded as
  never made), produces a failing crash state in some path;
- after a failed fdatasync nothing is retried into success: later flushes fail, bitmaps stay
  in_use, and the crash states stay sound; with the sticky failure disabled the same
  exploration finds a failing state;
- the registry's own durable steps are needed: without the in_use mark's durable write
  (under ``BitmapRegistry._mark``), or without the checkpoint's sync before in_use is cleared,
  the registry workload has a failing state; so it has without the data flush before a clear
  or an abdicate moves a bitmap's baseline (``BitmapRegistry._settle_data``).

Sizes fit CI; ``python tests/crash/powerloss.py --long`` explores more.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness
import powerloss as pl

SEED = int(os.environ.get("DIRTYBITS_POWERLOSS_SEED", "20261207"))
OPS = 30
STATES = int(os.environ.get("DIRTYBITS_POWERLOSS_STATES", "45"))
MORE_STATES = {"registry": 3}  # the registry's many paths: three times the states


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tdir = tmp_path_factory.mktemp("powerloss-templates")
    names = {w.template for w in pl.WORKLOADS.values() if w.template}
    return pl.templates_in(tdir, names)


def _explore(templates: dict[str, Any], work: Path, name: str, **kw: Any) -> pl.Report:
    ctx = pl.prepare(pl.WORKLOADS[name], templates, work / name, SEED, OPS)
    trace, error = pl.trace_run(ctx)
    assert error is None, error
    states = STATES * MORE_STATES.get(name, 1)
    return pl.explore(ctx, trace, randoms=2, max_states=states, seed=SEED, error=error, **kw)


@pytest.mark.interop
@pytest.mark.parametrize("name", sorted(pl.WORKLOADS))
def test_power_loss_states_are_sound(templates: dict[str, Any], tmp_path: Path, name: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rep = _explore(templates, tmp_path, name)
    with capsys.disabled():
        print(f"\npower loss (seed {SEED}): {rep.line()}")
    assert rep.points > 5 and rep.judged >= min(STATES, 20), rep.line()
    assert not rep.failures, "\n".join(str(f) for f in rep.failures[:5])


# Where to look first for each site's effect (a site is caught once any path fails).
ORDER = ("tracking-c4k", "untracked-c4k", "resilient-r64k", "tracking-c64k", "container",
         "recovery", "resilient-r1m", "resize-c4k", "resize-r1m", "extl2",
         "extl2-tracking", "compressed", "snapshot", "snapshot-apply", "snapshot-apply-s512",
         "registry")


def _sites(templates: dict[str, Any], work: Path) -> dict[str, list[str]]:
    """Sync site -> the paths that use it."""
    where: dict[str, list[str]] = {}
    for name in ORDER:
        ctx = pl.prepare(pl.WORKLOADS[name], templates, work / name, SEED, OPS)
        trace, error = pl.trace_run(ctx)
        assert error is None, error
        for site in trace.sites():
            where.setdefault(site, []).append(name)
    return where


@pytest.mark.interop
def test_removing_any_sync_produces_a_failing_state(templates: dict[str, Any],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    where = _sites(templates, tmp_path)
    # the persistence protocol's own durable steps are among them
    for needed in ("BitmapRegistry.checkpoint", "Qcow2BitmapStore._write_flags",
                   "WriteIntentMap.mark", "Qcow2Image.flush", "Qcow2Image.update_header",
                   "RawImage.flush", "snapshots._write_table", "snapshots.apply",
                   "snapshots._move_l1"):
        assert any(needed in s for s in where), (needed, sorted(where))
    lines, missed = [], []
    for site, names in sorted(where.items()):
        caught = None
        for name in names:
            ctx = pl.prepare(pl.WORKLOADS[name], templates, tmp_path / f"m-{name}", SEED, OPS)
            trace, _error = pl.trace_run(ctx, drop={site})
            rep = pl.explore(ctx, trace, randoms=2, max_states=150, seed=SEED,
                             stop_at_first=True, points_filter=pl.near(trace, {site}))
            if rep.failures:
                f = rep.failures[0]
                caught = f"{name}: {f['state']}: {f['problems'][0][:100]}"
                break
        lines.append(f"  {site}: {caught or 'NOT CAUGHT'}")
        if caught is None:
            missed.append(site)
    with capsys.disabled():
        print(f"\nsync sites removed in turn ({len(where)}):\n" + "\n".join(lines))
    assert not missed, f"removing these syncs went unnoticed: {missed}"


def _failed_sync_runs(templates: dict[str, Any], work: Path,
                      name: str) -> Iterator[tuple[int, pl.Report]]:
    ctx = pl.prepare(pl.WORKLOADS[name], templates, work / name, SEED, OPS)
    trace, _ = pl.trace_run(ctx)
    syncs = sum(1 for e in trace.events if e.kind == "sync")
    for k in sorted({1, syncs // 4, syncs // 2, 3 * syncs // 4}):
        ctx = pl.prepare(pl.WORKLOADS[name], templates, work / f"{name}-{k}", SEED, OPS)
        trace, error = pl.trace_run(ctx, fail_sync=k)
        assert error is not None  # the failure reached the caller (close reports it)
        yield k, pl.explore(ctx, trace, randoms=2, max_states=25, seed=SEED, error=error)


@pytest.mark.interop
def test_failed_fdatasync_is_never_retried_into_success(templates: dict[str, Any],
                                                        tmp_path: Path) -> None:
    for k, rep in _failed_sync_runs(templates, tmp_path, "tracking-c4k"):
        assert not rep.failures, (k, rep.failures[:3])


@pytest.mark.interop
def test_failed_fdatasync_then_success_would_be_caught(templates: dict[str, Any],
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same exploration, with the engine forgetting a failed sync (a retry then
    succeeds without the dropped pages), finds a failing state: the test above can fail."""
    from dirtybits.qcow2.image import Qcow2Image

    real = Qcow2Image._fdatasync

    def forgetful(self: Qcow2Image, fd: int, what: str) -> None:
        try:
            real(self, fd, what)
        finally:
            self._sync_failed = None

    monkeypatch.setattr(Qcow2Image, "_fdatasync", forgetful)
    found = [(k, rep.failures[0]) for k, rep in
             _failed_sync_runs(templates, tmp_path, "tracking-c4k") if rep.failures]
    assert found, "a forgetful engine went unnoticed"


@pytest.mark.interop
def test_failed_fdatasync_leaves_bitmaps_in_use(templates: dict[str, Any],
                                                tmp_path: Path) -> None:
    """The behaviour itself: once an fdatasync failed, every flush fails, close reports it,
    and the bitmaps written since are in_use on disk."""
    import dirtybits
    from dirtybits.errors import ImageIOError

    tpl = templates["c64k"]
    path = tmp_path / "d.qcow2"
    path.write_bytes(tpl.qcow2.read_bytes())
    rec = pl.Recorder(fail_sync=0)
    with rec:
        disk = dirtybits.open(str(path), checkpoint=dirtybits.CheckpointPolicy(
            interval=None, idle=None, threshold_bits=None))
        disk.write(0, b"\x01" * 65536)
        with pytest.raises(ImageIOError):
            disk.flush()
        for _ in range(2):
            with pytest.raises(ImageIOError, match="earlier flush"):
                disk.flush()
        with pytest.raises(ImageIOError):
            disk.close()
    res = harness.KillResult(seed=0, template="c64k", mode="power")
    harness.verify(path, tpl, res, quiet=False, qemu_sample=False)
    assert not res.problems, res.problems
    assert sorted(res.in_use) == ["g4k", "g64k"]


@pytest.mark.interop
def test_extl2_paths_need_each_of_their_syncs(templates: dict[str, Any], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Extended L2 entries on their own: every sync site the two extl2 paths (untracked,
    tracking) use, removed in turn, leaves a failing crash state in one of them (subcluster
    bitmaps reach the disk only after the data they mark, the refcounts of new clusters
    before the entries naming them, the frees of a flush before it returns)."""
    paths = ("extl2", "extl2-tracking")
    where: dict[str, list[str]] = {}
    for name in paths:
        ctx = pl.prepare(pl.WORKLOADS[name], templates, tmp_path / name, SEED, OPS)
        trace, error = pl.trace_run(ctx)
        assert error is None, error
        for site in trace.sites():
            where.setdefault(site, []).append(name)
    assert any("Qcow2Image.flush" in s for s in where), sorted(where)
    lines, missed = [], []
    for site, names in sorted(where.items()):
        caught = None
        for name in names:
            ctx = pl.prepare(pl.WORKLOADS[name], templates, tmp_path / "m", SEED, OPS)
            trace, _error = pl.trace_run(ctx, drop={site})
            rep = pl.explore(ctx, trace, randoms=2, max_states=150, seed=SEED,
                             stop_at_first=True, points_filter=pl.near(trace, {site}))
            if rep.failures:
                caught = f"{name}: {rep.failures[0]['problems'][0][:100]}"
                break
        lines.append(f"  {site}: {caught or 'NOT CAUGHT'}")
        if caught is None:
            missed.append(site)
    with capsys.disabled():
        print(f"\nextl2 sync sites removed in turn ({len(where)}):\n" + "\n".join(lines))
    assert not missed, f"removing these syncs went unnoticed: {missed}"


def _registry_fails(templates: dict[str, Any], work: Path, *,
                    drop: set[str] | None = None, drop_under: set[str] | None = None,
                    near: set[str] | None = None) -> pl.Report:
    ctx = pl.prepare(pl.WORKLOADS["registry"], templates, work, SEED, OPS)
    trace, error = pl.trace_run(ctx, drop=drop, drop_under=drop_under)
    assert error is None, error
    keep = pl.near_steps(trace, ctx, near, window=1) if near else pl.near_dropped(trace)
    return pl.explore(ctx, trace, randoms=2, max_states=150, seed=SEED, stop_at_first=True,
                      points_filter=keep)


@pytest.mark.interop
@pytest.mark.parametrize("what", ["in_use mark", "checkpoint sync"])
def test_registry_workload_needs_the_mark_and_the_checkpoint_sync(
        templates: dict[str, Any], tmp_path: Path, what: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The registry workload alone fails without the durable in_use mark (every sync and
    RWF_DSYNC write made under ``BitmapRegistry._mark``: the flag write of ``set_in_use``,
    from the write path and from the operations) or without the checkpoint's sync before it
    clears in_use (the site ``BitmapRegistry.checkpoint``)."""
    if what == "in_use mark":
        rep = _registry_fails(templates, tmp_path / "m", drop_under={"BitmapRegistry._mark"})
    else:
        ctx = pl.prepare(pl.WORKLOADS["registry"], templates, tmp_path / "s", SEED, OPS)
        trace, _ = pl.trace_run(ctx)
        sites = {s for s in trace.sites() if "BitmapRegistry.checkpoint" in s}
        assert len(sites) == 1, sorted(trace.sites())
        rep = _registry_fails(templates, tmp_path / "c", drop=sites)
    with capsys.disabled():
        first = rep.failures[0] if rep.failures else None
        print(f"\nregistry without the {what}: {rep.line()}\n  {first}")
    assert rep.failures, f"removing the {what} went unnoticed"


@pytest.mark.interop
def test_registry_baseline_moves_only_over_durable_data(templates: dict[str, Any],
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Was a silent miss: an in-place clear (and an abdicate) stored the emptied bitmap
    consistent after a checkpoint that only syncs; a write issued just before, its L2 entry
    still in memory, was then taken back by a power cut, so the disk differed from the data at
    the clear with no bit set. The fix flushes the data first (``_settle_data``); without it
    the same exploration finds the failing state."""
    from dirtybits.block.registry import BitmapRegistry

    monkeypatch.setattr(BitmapRegistry, "_settle_data", lambda self, persistent: None)
    rep = _registry_fails(templates, tmp_path / "b", near={"clear", "abdicate"})
    assert rep.failures, "a clear over unflushed data went unnoticed"
    assert "misses" in rep.failures[0]["problems"][0], rep.failures[0]
