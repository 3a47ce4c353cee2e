"""The bitmap engine (``dirtybits.bitmap``) against a plain set-of-granules model.

* every mutating operation (set, reset, clear, fill, merge across granularities, truncate)
  and every query (get, count, next_dirty/next_clean/next_dirty_area, extents clipped to
  ranges, serialized bytes, sha256) is checked by hypothesis against ``Model``, which knows
  nothing but "granule k is dirty"; sizes need not be multiples of the granularity and
  granularities run from 512 B to 2 GiB;
* the same properties again with the engine's vectorised block size shrunk to a few words, so
  multi-block paths (run boundaries across blocks, merges block by block) are exercised on
  small bitmaps; and large bitmaps (16 TiB at 64 KiB) with the real block size;
* the change tracker: the chunks it reports are exactly the chunks whose serialized bytes
  changed, and re-setting dirty bits reports nothing;
* QEMU's own numbers: every sha256 of the reference's table (§6), the observed data cluster
  bytes (§2.5), count past the disk end, the merge error text;
* (``interop``) ``extents`` equals what ``nbdinfo --map=qemu:dirty-bitmap:b0`` prints from
  qemu-nbd after qemu-io wrote to an image with an enabled bitmap.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtybits.bitmap import BitmapError, DirtyBitmap
from dirtybits.bitmap import dirty_bitmap as engine
from dirtybits.errors import DirtybitsError
from peers import nbd_map, qemu_img, qemu_io

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
GRANULARITIES = [512, 4 * KiB, 64 * KiB, 2 * GiB]


class Model:
    """The specification: a set of dirty granule indices and QEMU's rules, one bit at a time."""

    def __init__(self, size: int, gran: int) -> None:
        self.size, self.g = size, gran
        self.bits = -(-size // gran)
        self.dirty: set[int] = set()

    def set(self, off: int, n: int) -> None:
        if n:
            self.dirty.update(range(off // self.g, (off + n - 1) // self.g + 1))

    def reset(self, off: int, n: int) -> None:
        end = off + n
        stop = self.bits if end == self.size else end // self.g
        self.dirty.difference_update(range(-(-off // self.g), stop))

    def get(self, off: int) -> bool:
        return off // self.g in self.dirty

    def extents(self, off: int, end: int) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        pos = off
        while pos < end:
            d = self.get(pos)
            nxt = min(end, (pos // self.g + 1) * self.g)
            if runs and runs[-1][2] == d:
                runs[-1] = (runs[-1][0], nxt - runs[-1][0], d)
            else:
                runs.append((pos, nxt - pos, d))
            pos = nxt
        return runs

    def next_state(self, off: int, end: int, dirty: bool) -> int | None:
        end = min(end, self.size)
        pos = off
        while pos < end:
            if self.get(pos) == dirty:
                return pos
            pos = (pos // self.g + 1) * self.g
        return None

    def words(self, minimum: int = 0) -> bytes:
        out = bytearray(max(minimum, -(-self.bits // 64)) * 8)
        for k in self.dirty:
            out[k >> 3] |= 1 << (k & 7)
        return bytes(out)


@contextmanager
def small_blocks(words: int) -> Iterator[None]:
    """Shrink the engine's vectorised block so small bitmaps cross many block boundaries, and
    send every multi-word range through the numpy path instead of word-by-word ints."""
    saved = engine._SCAN_WORDS, engine._FEW_WORDS
    engine._SCAN_WORDS, engine._FEW_WORDS = words, 0
    try:
        yield
    finally:
        engine._SCAN_WORDS, engine._FEW_WORDS = saved


@st.composite
def geometry(draw: st.DrawFn, grans: list[int] = GRANULARITIES) -> tuple[int, int]:
    """(size, granularity): up to ~6 words of bits, often a partial last granule."""
    gran = draw(st.sampled_from(grans))
    bits = draw(st.integers(0, 6 * 64 + 3))
    if bits == 0:
        return 0, gran
    short = draw(st.sampled_from([0, 0, 1, gran // 2, gran - 1]))
    return bits * gran - short, gran


_COIN = st.booleans()
_ANY = st.integers(0, 1 << 32)
_EDGE_DELTA = st.sampled_from([0, 1, -1, 64, 1 << 30])


def position(draw: st.DrawFn, size: int, gran: int) -> int:
    """A byte position in [0, size], half of the time on or next to a granule edge.

    Built from module-level strategies: composing new ones per draw dominates the run time.
    """
    if draw(_COIN):
        return draw(_ANY) % (size + 1)
    k = draw(_ANY) % (-(-size // gran) + 1)
    delta = draw(_EDGE_DELTA)
    return max(0, min(size, k * gran + (gran // 2 if delta == 1 << 30 else delta)))


def byte_range(draw: st.DrawFn, size: int, gran: int) -> tuple[int, int]:
    a, b = sorted((position(draw, size, gran), position(draw, size, gran)))
    return a, b - a


_OPS = st.sampled_from(["set", "set", "set", "reset", "reset", "clear", "fill"])


def apply_ops(draw: st.DrawFn, bm: DirtyBitmap, model: Model, count: int = 12) -> None:
    for _ in range(draw(_ANY) % (count + 1)):
        op = draw(_OPS)
        if op in ("set", "reset"):
            off, n = byte_range(draw, bm.size, bm.granularity)
            getattr(bm, op)(off, n)
            getattr(model, op)(off, n)
        elif op == "clear":
            bm.clear()
            model.dirty.clear()
        else:
            bm.fill()
            model.dirty = set(range(model.bits))


def assert_matches(bm: DirtyBitmap, model: Model) -> None:
    assert bm.count_bits() == len(model.dirty)
    assert bm.count() == len(model.dirty) * model.g
    assert bm.to_bytes() == model.words()
    assert bm.sha256() == hashlib.sha256(model.words(minimum=1)).hexdigest()
    assert list(bm.extents()) == model.extents(0, model.size)


# ---------------------------------------------------------------------------- QEMU's numbers


@pytest.mark.parametrize(
    ("size", "gran", "dirty_bits", "digest"),
    [
        (MiB, 64 * KiB, [], "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
        (MiB, 64 * KiB, [0, 8], "4adeb4453cb2e0d4f186667f3052bf6c34b102cf0fa25910f6964f4f8a55ab84"),
        (MiB, 4 * KiB, [], "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"),
        (2 * MiB, 4 * KiB, [], "f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b"),
        (
            1_000_000,
            64 * KiB,
            [15],
            "b54b1a339e9f1b672af88b397362d05c99e30d790835dbfd74fc9117a6de76d3",
        ),
        (
            10 * GiB,
            64 * KiB,
            [0, 100, 163839],
            "98397777cdc72913629973b575987569e4a102a83f93395f38b72f209cdfcffc",
        ),
    ],
)
def test_sha256_matches_qemu_x_debug_hash(
    size: int, gran: int, dirty_bits: list[int], digest: str
) -> None:
    bm = DirtyBitmap(size, gran)
    for k in dirty_bits:
        bm.set(k * gran, 1)
    assert bm.sha256() == digest


def test_sha256_of_an_empty_disk_hashes_one_word() -> None:
    # QEMU allocates max(1, ceil(bits/64)) words even for zero bits.
    assert DirtyBitmap(0, 64 * KiB).sha256() == hashlib.sha256(bytes(8)).hexdigest()
    assert DirtyBitmap(0, 64 * KiB).serialized_size == 0


def test_serialized_bytes_match_qemu_data_cluster() -> None:
    # §2.5 [obs 7.2]: writes at [0,64K) and [512K,516K) => data cluster begins 01 01 00 00.
    bm = DirtyBitmap(MiB, 64 * KiB)
    bm.set(0, 64 * KiB)
    bm.set(512 * KiB, 4 * KiB)
    cluster = bm.to_bytes(0, 64 * KiB)
    assert cluster[:8] == bytes([1, 1, 0, 0, 0, 0, 0, 0])
    assert len(cluster) == 64 * KiB and not any(cluster[8:])
    assert bm.serialized_size == 8 and bm.cluster_count(64 * KiB) == 1
    assert list(bm.extents()) == [
        (0, 65536, True),
        (65536, 458752, False),
        (524288, 65536, True),
        (589824, 458752, False),
    ]


def test_count_counts_whole_granules_past_the_disk_end() -> None:
    # [obs 7.2] 1,000,000-byte raw disk, one dirty last bit => count 65536.
    bm = DirtyBitmap(1_000_000, 64 * KiB)
    bm.set(999_999, 1)
    assert bm.count() == 65536 and bm.count_bits() == 1
    assert list(bm.extents()) == [(0, 983040, False), (983040, 16960, True)]


def test_merge_of_different_sizes_fails_with_qemus_text_and_changes_nothing() -> None:
    dst, src = DirtyBitmap(MiB, 64 * KiB), DirtyBitmap(2 * MiB, 64 * KiB)
    src.fill()
    dst.set(0, 1)
    with pytest.raises(BitmapError) as err:
        dst.merge_from(src)
    assert str(err.value) == (
        "Bitmaps are of different sizes (destination size is 1048576, source size is 2097152)"
        " and can't be merged"
    )
    assert isinstance(err.value, ValueError) and isinstance(err.value, DirtybitsError)
    assert dst.count_bits() == 1


@pytest.mark.parametrize("gran", [0, 256, 511, 513, 3 * 512, 1 << 64])
def test_bad_granularity_is_refused(gran: int) -> None:
    with pytest.raises(BitmapError, match="Granularity must be power of 2 and at least 512"):
        DirtyBitmap(MiB, gran)


def test_ranges_outside_the_disk_are_refused() -> None:
    bm = DirtyBitmap(MiB, 64 * KiB)
    for call in (
        lambda: bm.set(MiB - 1, 2),
        lambda: bm.set(-1, 1),
        lambda: bm.reset(0, MiB + 1),
        lambda: bm.get(MiB),
        lambda: bm.extents(512 * KiB, MiB),
        lambda: bm.next_dirty(-1),
    ):
        with pytest.raises(BitmapError):
            call()
    assert bm.count_bits() == 0


def test_reset_keeps_partly_covered_granules_and_clears_the_partial_last_one() -> None:
    bm = DirtyBitmap(3 * 64 * KiB + 1000, 64 * KiB)  # 4 granules, the last one 1000 bytes
    bm.fill()
    bm.reset(1, 2 * 64 * KiB)  # covers granule 1 fully, 0 and 2 partly
    assert [bm.get(k * 64 * KiB) for k in range(4)] == [True, False, True, True]
    bm.reset(3 * 64 * KiB + 10, 990)  # reaches the disk end but does not cover granule 3
    assert bm.get(3 * 64 * KiB)
    bm.reset(3 * 64 * KiB, 1000)  # the whole partial last granule
    assert not bm.get(3 * 64 * KiB) and bm.count_bits() == 2


# ---------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_operations_match_the_model(data: st.DataObject) -> None:
    size, gran = data.draw(geometry())
    bm, model = DirtyBitmap(size, gran), Model(size, gran)
    apply_ops(data.draw, bm, model)
    assert_matches(bm, model)
    for _ in range(5):
        if size:
            off = data.draw(st.integers(0, size - 1))
            assert bm.get(off) == model.get(off)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from([1, 2, 4]))
def test_operations_match_the_model_across_block_boundaries(
    data: st.DataObject, block_words: int
) -> None:
    with small_blocks(block_words):
        test_operations_match_the_model.hypothesis.inner_test(data)  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from([1, 3, 1 << 16]))
def test_extents_are_clipped_maximal_runs(data: st.DataObject, block_words: int) -> None:
    size, gran = data.draw(geometry())
    bm, model = DirtyBitmap(size, gran), Model(size, gran)
    apply_ops(data.draw, bm, model)
    off, n = byte_range(data.draw, size, gran)
    with small_blocks(block_words):
        runs = list(bm.extents(off, n))
        dirty = list(bm.dirty_extents(off, n))
    assert runs == model.extents(off, off + n)
    assert dirty == [(s, ln) for s, ln, d in runs if d]
    # The invariants nbdinfo relies on, stated directly.
    assert all(ln > 0 for _, ln, _ in runs)
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))
    assert sum(ln for _, ln, _ in runs) == n


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_searches_match_the_model(data: st.DataObject) -> None:
    size, gran = data.draw(geometry())
    bm, model = DirtyBitmap(size, gran), Model(size, gran)
    apply_ops(data.draw, bm, model)
    off = position(data.draw, size, gran)
    end = data.draw(st.none() | st.integers(0, size + 3 * gran))
    stop = size if end is None else end
    assert bm.next_dirty(off, end) == model.next_state(off, stop, True)
    assert bm.next_clean(off, end) == model.next_state(off, stop, False)
    max_length = data.draw(st.none() | st.integers(1, 3 * gran))
    start = model.next_state(off, stop, True)
    if start is None:
        expected = None
    else:
        limit = min(stop, size) if max_length is None else min(stop, size, start + max_length)
        clean = model.next_state(start, limit, False)
        expected = (start, (limit if clean is None else clean) - start)
    assert bm.next_dirty_area(off, stop, max_length) == expected


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from([1, 2, 1 << 16]), st.sampled_from([0.0, 1e9]))
def test_merge_across_granularities_matches_sparse_merge(
    data: st.DataObject, block_words: int, runs_per_word: float
) -> None:
    """Both strategies: run by run (QEMU's loop) and resampling whole words."""
    grans = [512, 1024, 4 * KiB, 64 * KiB]
    size, _ = data.draw(geometry([64 * KiB]))
    gs, gt = data.draw(st.sampled_from(grans)), data.draw(st.sampled_from(grans))
    src, src_model = DirtyBitmap(size, gs), Model(size, gs)
    dst, dst_model = DirtyBitmap(size, gt), Model(size, gt)
    apply_ops(data.draw, src, src_model, 6)
    apply_ops(data.draw, dst, dst_model, 3)
    for k in src_model.dirty:  # each dirty source range marks every overlapped target granule
        dst_model.set(k * gs, min((k + 1) * gs, size) - k * gs)
    saved = engine._RUN_MERGE_MAX
    engine._RUN_MERGE_MAX = runs_per_word
    try:
        with small_blocks(block_words):
            dst.merge_from(src)
    finally:
        engine._RUN_MERGE_MAX = saved
    assert_matches(dst, dst_model)
    assert_matches(src, src_model)  # the source is untouched


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_serialization_round_trips_cluster_by_cluster(data: st.DataObject) -> None:
    size, gran = data.draw(geometry())
    bm, model = DirtyBitmap(size, gran), Model(size, gran)
    apply_ops(data.draw, bm, model)
    cluster = data.draw(st.sampled_from([8, 16, 64, 512]))
    raw = model.words()
    assert bm.cluster_count(cluster) == -(-len(raw) // cluster)
    loaded = DirtyBitmap(size, gran)
    for i in range(bm.cluster_count(cluster)):
        chunk = bm.to_bytes(i * cluster, cluster)
        assert chunk == raw[i * cluster : (i + 1) * cluster].ljust(cluster, b"\0")
        assert bm.is_zero_range(i * cluster, cluster) == (not any(chunk))
        inside = (i + 1) * cluster * 8 <= model.bits
        assert bm.is_full_range(i * cluster, cluster) == (inside and chunk == b"\xff" * cluster)
        # A second load overwrites the first completely, count included.
        loaded.load_bytes(i * cluster, b"\xff" * cluster)
        loaded.load_bytes(i * cluster, chunk)
    assert loaded == bm
    assert loaded.count_bits() == bm.count_bits()
    assert DirtyBitmap.from_bytes(size, gran, raw) == bm
    assert loaded.sha256() == bm.sha256()


@settings(deadline=None)
@given(st.data())
def test_load_ignores_bits_past_the_end(data: st.DataObject) -> None:
    size, gran = data.draw(geometry())
    junk = data.draw(st.binary(min_size=0, max_size=64))
    bm = DirtyBitmap.from_bytes(size, gran, b"\xff" * (-(-size // gran) // 8 + 16) + junk)
    model = Model(size, gran)
    model.dirty = set(range(model.bits))
    assert_matches(bm, model)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_change_tracker_reports_exactly_the_changed_chunks(data: st.DataObject) -> None:
    size, gran = data.draw(geometry())
    chunk = data.draw(st.sampled_from([8, 16, 32]))
    bm, model = DirtyBitmap(size, gran), Model(size, gran)
    apply_ops(data.draw, bm, model, 4)
    bm.track_changes(chunk)
    assert bm.changed_chunks() == []
    before = bm.to_bytes()
    sets = [byte_range(data.draw, size, gran) for _ in range(data.draw(st.integers(0, 6)))]
    with small_blocks(data.draw(st.sampled_from([1, 1 << 16]))):
        for off, n in sets:
            bm.set(off, n)
    after = bm.to_bytes()
    changed = [
        i
        for i in range(bm.cluster_count(chunk))
        if before[i * chunk : (i + 1) * chunk] != after[i * chunk : (i + 1) * chunk]
    ]
    assert bm.changed_chunk_count() == len(changed)
    assert bm.take_changed_chunks() == changed
    for off, n in sets:  # already dirty: nothing to write
        bm.set(off, n)
    assert bm.take_changed_chunks() == []


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_change_tracker_covers_every_kind_of_change(data: st.DataObject) -> None:
    size, gran = data.draw(geometry())
    bm, model = DirtyBitmap(size, gran), Model(size, gran)
    apply_ops(data.draw, bm, model, 4)
    bm.track_changes(8)
    snapshots = bm.to_bytes()
    # A finer and a coarser source too (bounded: 512-byte granules on a 2 GiB-granule disk
    # would be gigabytes of bits).
    other_gran = data.draw(st.sampled_from([gran, max(512, gran >> 6), gran << 3]))
    other = DirtyBitmap(size, other_gran)
    other.set(*byte_range(data.draw, size, gran))
    with small_blocks(data.draw(st.sampled_from([1, 1 << 16]))):
        apply_ops(data.draw, bm, model, 6)
        bm.merge_from(other)
    now = bm.to_bytes()
    differs = {
        i for i in range(len(now) // 8) if now[i * 8 : i * 8 + 8] != snapshots[i * 8 : i * 8 + 8]
    }
    assert differs <= set(bm.take_changed_chunks())  # never miss a chunk a flush must write


def test_change_tracker_marks_nothing_when_loading_and_can_be_handed_back() -> None:
    bm = DirtyBitmap(64 * GiB, 64 * KiB)  # 1 Mi bits = 128 KiB serialized = 2 clusters
    bm.track_changes(64 * KiB)
    bm.load_bytes(0, b"\xff" * 64 * KiB)
    assert bm.changed_chunks() == [] and bm.count_bits() == 512 * KiB
    bm.load_bytes(64 * KiB, b"\x01", mark=True)
    taken = bm.take_changed_chunks()
    assert taken == [1]
    bm.mark_chunks_changed(taken)  # the flush failed
    assert bm.take_changed_chunks() == [1]
    bm.clear()
    assert bm.take_changed_chunks() == [0, 1]
    bm.set(32 * GiB - 1, 2)  # two granules, one in each cluster's half of the disk
    assert bm.take_changed_chunks() == [0, 1]
    bm.mark_chunks_changed()
    assert bm.changed_chunk_count() == 2
    with pytest.raises(DirtybitsError):
        bm.mark_chunks_changed([2])


# ---------------------------------------------------------------------------- whole bitmaps


def test_copy_is_independent_and_equal() -> None:
    bm = DirtyBitmap(10 * MiB, 4 * KiB)
    bm.set(5000, 10000)
    dup = bm.copy()
    assert dup == bm and dup.count_bits() == bm.count_bits()
    dup.set(0, 1)
    assert dup != bm and not bm.get(0)
    assert bm != DirtyBitmap(10 * MiB, 8 * KiB)


@settings(deadline=None)
@given(st.data())
def test_truncate_drops_bits_past_the_new_end_and_keeps_the_rest(data: st.DataObject) -> None:
    size, gran = data.draw(geometry([512, 64 * KiB]))
    bm, model = DirtyBitmap(size, gran), Model(size, gran)
    apply_ops(data.draw, bm, model)
    bm.track_changes(8)
    new_size = data.draw(st.integers(0, 2 * size + gran))
    bm.truncate(new_size)
    grown = Model(new_size, gran)
    grown.dirty = {k for k in model.dirty if k < grown.bits}
    assert_matches(bm, grown)
    assert bm.changed_chunk_count() == bm.cluster_count(8)


# ---------------------------------------------------------------------------- big bitmaps


def test_sixteen_tebibyte_bitmap_runs_searches_and_serializes() -> None:
    size, gran = 16 * TiB, 64 * KiB  # 2^28 bits, 32 MiB of words, many blocks
    bm = DirtyBitmap(size, gran)
    bm.set(0, 1)
    bm.set(TiB - 1, 3 * TiB)  # a run crossing tens of thousands of words
    bm.set(size - 1, 1)
    assert bm.count_bits() == 1 + (4 * TiB - 1) // gran - (TiB - 1) // gran + 1 + 1
    runs = list(bm.extents())
    assert [r[2] for r in runs] == [True, False, True, False, True]
    assert runs[2] == (TiB - gran, 3 * TiB + gran, True)
    assert runs[4] == (size - gran, gran, True)
    assert bm.next_dirty(runs[3][0]) == size - gran  # far away: the growing scan
    assert bm.next_clean(TiB) == 4 * TiB
    assert bm.next_dirty_area(gran, size) == (TiB - gran, 3 * TiB + gran)
    assert bm.next_dirty_area(TiB, size, max_length=gran) == (TiB, gran)
    assert bm.is_full_range(bm.serialized_size // 8, 64 * KiB)
    assert bm.is_zero_range(bm.serialized_size // 2, 64 * KiB)

    coarse = DirtyBitmap(size, 2 * GiB)
    coarse.merge_from(bm)
    assert [(s, n) for s, n in coarse.dirty_extents()] == [
        (0, 2 * GiB),
        (TiB - 2 * GiB, 3 * TiB + 2 * GiB),
        (size - 2 * GiB, 2 * GiB),
    ]
    fine = DirtyBitmap(size, 64 * KiB)
    fine.merge_from(coarse)
    assert list(fine.dirty_extents()) == list(coarse.dirty_extents())


def test_merge_coarse_source_into_512_byte_granules_at_scale() -> None:
    size = 64 * GiB + 512  # 2^27 + 1 bits at 512 B: 32 blocks of words and a partial one
    src, dst = DirtyBitmap(size, 2 * GiB), DirtyBitmap(size, 512)
    src.set(3 * GiB, 1)
    src.set(size - 1, 1)
    dst.merge_from(src)
    assert list(dst.dirty_extents()) == [(2 * GiB, 2 * GiB), (64 * GiB, 512)]
    assert dst.count() == 2 * GiB + 512


# ---------------------------------------------------------------------------- interop


@pytest.mark.interop
@pytest.mark.parametrize(("size", "gran"), [(4 * MiB + 3 * 512, 64 * KiB), (MiB, 4 * KiB)])
def test_extents_match_nbdinfo_over_qemu_nbd(
    qemu_tools: dict[str, str], tmp_path: Path, size: int, gran: int
) -> None:
    image = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, str(size))
    qemu_img("bitmap", "--add", "-g", str(gran), image, "b0")
    writes = [
        (0, 4096),
        (3 * gran + 512, 2 * gran),
        (10 * gran, 512),
        (11 * gran, gran),
        (size - 512, 512),
    ]
    qemu_io(image, *[f"write {off} {n}" for off, n in writes], fmt="qcow2")
    bm = DirtyBitmap(size, gran)
    for off, n in writes:
        bm.set(off, n)
    export = size // 512 * 512
    theirs = json.loads(nbd_map(image, "b0", "--json"))
    assert [(e["offset"], e["length"], e["type"] == 1) for e in theirs] == list(
        bm.extents(0, export))


@pytest.mark.parametrize("word", [1, 63, 64, 512, 513, 4608, 4609, 16383])
def test_searches_find_a_lone_granule_wherever_the_growing_scan_puts_it(word: int) -> None:
    gran = 512
    bits = 16384 * 64  # the scan's blocks (from word 1) end at words 513, 4609, ...
    target = (word * 64 + 5) * gran
    bm = DirtyBitmap(bits * gran, gran)
    bm.set(target, 1)
    assert bm.next_dirty(0) == target
    assert bm.next_dirty(gran) == target
    assert bm.next_dirty(0, target) is None
    assert bm.next_dirty_area(0, bm.size) == (target, gran)
    bm.fill()
    bm.reset(target, gran)
    assert bm.next_clean(0) == target
    assert bm.next_clean(3 * gran) == target
    assert bm.next_clean(target + gran) is None


@pytest.mark.parametrize("gran", [1 << 50, 1 << 62, 1 << 63])
def test_granularities_up_to_two_to_the_63_on_the_largest_disk(gran: int) -> None:
    # Byte offsets beyond int64 must not overflow in the vectorised run search.
    size = (1 << 63) - 1
    bm, model = DirtyBitmap(size, gran), Model(size, gran)
    for off, n in [(5 << 40, 1), (size - 1, 1), (1 << 62, 3)]:
        bm.set(off, n)
        model.set(off, n)
    assert list(bm.extents()) == model.extents(0, size)
    assert list(bm.extents(1 << 61, size - (1 << 61))) == model.extents(1 << 61, size)
    assert bm.count() == len(model.dirty) * gran
    assert bm.next_dirty(1) == model.next_state(1, size, True)
    assert bm.next_clean(1 << 62) == model.next_state(1 << 62, size, False)
