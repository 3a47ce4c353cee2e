"""The numpy-free dump scanner against the bitmap engine: the same extents, always."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
from dirtybits.bitmap.serialized_runs import ONES, ZEROS, serialized_extents
from dirtybits.block import qcow2_bitmaps
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.qcow2.image import Qcow2Image


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3 << 20), st.sampled_from([512, 4096, 65536]),
       st.sampled_from([512, 4096]),
       st.lists(st.tuples(st.integers(0, (3 << 20) - 1), st.integers(1, 1 << 20)), max_size=12),
       st.booleans(), st.integers(0, 600))
def test_same_extents_as_the_engine(size: int, gran: int, cs: int,
                                    writes: list[tuple[int, int]], fill: bool,
                                    cut: int) -> None:
    bm = DirtyBitmap(size, gran)
    if fill:
        bm.fill()
    for off, n in writes:
        if off < size:
            (bm.reset if fill else bm.set)(off, min(n, size - off))
    clusters: list[bytes | int] = []
    for i in range(bm.cluster_count(cs)):
        data = bm.to_bytes(i * cs, cs)
        if not any(data):
            clusters.append(ZEROS)
        elif bm.is_full_range(i * cs, cs):
            clusters.append(ONES)
        else:
            clusters.append(data)
    end = max(0, (size & ~511) - cut * 512) or size
    got = list(serialized_extents(clusters, cs, bm.bits, gran, end))
    assert got == list(bm.extents(0, end))


def test_store_dump_sparse_and_dense_paths(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "d.qcow2")
    size = 64 << 20
    Qcow2Image.create(path, size)
    sparse, dense = DirtyBitmap(size, 512), DirtyBitmap(size, 512)
    for i in range(0, size, 1 << 20):
        sparse.set(i + 4096, 8192)
    for i in range(0, size, 1024):  # every other granule: every byte 0x55
        dense.set(i, 512)
    with Qcow2Image.open(path, keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        for name, bm in (("sparse", sparse), ("dense", dense)):
            store.add(name, 512)
            store.store(name, bm)
    with Qcow2Image.open(path, readonly=True) as img:
        store = Qcow2BitmapStore(img)
        assert list(store.extents("sparse", size)) == list(sparse.extents(0, size))
        assert list(store.extents("dense", size)) == list(dense.extents(0, size))
        calls: list[str] = []
        real_load = store.load
        monkeypatch.setattr(qcow2_bitmaps, "DENSE_EDGES", 1000)
        monkeypatch.setattr(store, "load", lambda n: calls.append(n) or real_load(n))
        assert list(store.extents("dense", size)) == list(dense.extents(0, size))
        assert calls == ["dense"]  # past the edge limit: the numpy engine
