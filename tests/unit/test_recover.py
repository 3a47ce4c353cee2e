"""``--recover``: the rebuilt bitmap is exactly the granules whose guest data differs from the
reference, for qcow2 chains and raw references, at 512 B / 64 KiB / 2 MiB granularity, odd
sizes, size changes, and an interrupted run leaves the file byte-identical."""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
from dirtybits.block.children import open_qcow2
from dirtybits.block.open import open_for_bitmaps, open_image
from dirtybits.block.qcow2_bitmaps import BitmapOperationError, Qcow2BitmapStore
from dirtybits.block.raw import RawImage
from dirtybits.block.recover import DataCompare, differing_granules, recover_bitmap
from dirtybits.block.registry import DiskState
from dirtybits.cli.bitmap_recover import apply_recover, check_arguments
from dirtybits.errors import UsageError
from dirtybits.qcow2.image import Qcow2Image

KiB, MiB = 1024, 1 << 20
SIZE = 5 * MiB + 3 * 512  # not a multiple of any granularity above 512


# ---------------------------------------------------------------- building images
def qcow2(path: Path, size: int = SIZE, backing: Path | None = None, fmt: str = "qcow2",
          cluster_size: int = 64 * KiB) -> Path:
    Qcow2Image.create(str(path), size, cluster_size=cluster_size,
                      backing_file=str(backing) if backing else None,
                      backing_format=fmt if backing else None)
    return path


def raw(path: Path, size: int = SIZE) -> Path:
    RawImage.create(str(path), size)
    return path


Write = tuple[str, int, int, int]  # kind ("data", "zero", "same"), offset, length, seed


def random_writes(rnd: random.Random, size: int, n: int) -> list[Write]:
    out: list[Write] = []
    for _ in range(n):
        kind = rnd.choice(("data", "data", "zero", "same"))
        length = rnd.choice((1, 7, 512, 4096, 65536, rnd.randrange(1, 300 * KiB)))
        off = rnd.randrange(0, size - length)
        out.append((kind, off, length, rnd.randrange(1 << 30)))
    return out


def apply_writes(path: Path, writes: list[Write], *, bitmaps: bool = False) -> None:
    """Write through the bare engine (``bitmaps``: keep the bitmaps extension, as a writer
    that marked them in_use and then crashed would leave it)."""
    img: Qcow2Image | RawImage
    if path.read_bytes()[:4] == b"QFI\xfb":
        img = open_qcow2(str(path), keep_bitmaps=bitmaps)
    else:
        img = RawImage(str(path))
    with img:
        for kind, off, length, seed in writes:
            if kind == "zero":
                img.write_zeroes(off, length)
            elif kind == "same":
                img.write(off, img.read(off, length))  # rewrites identical data
            else:
                img.write(off, random.Random(seed).randbytes(length))


def oracle(img_path: Path, ref_path: Path, granularity: int) -> DirtyBitmap:
    """Granule by granule in plain Python: the set the rebuild must produce."""
    with open_image(str(img_path), readonly=True) as a, \
            open_image(str(ref_path), readonly=True) as b:
        da, db = a.read(0, a.size), b.read(0, b.size)
    bm = DirtyBitmap(len(da), granularity)
    for off in range(0, len(da), granularity):
        end = min(off + granularity, len(da))
        if end > len(db) or da[off:end] != db[off:end]:
            bm.set(off, end - off)
    return bm


def rebuilt(img_path: Path, ref_path: Path, granularity: int, **kw: int) -> DirtyBitmap:
    with open_image(str(img_path), readonly=True) as a, \
            open_image(str(ref_path), readonly=True) as b:
        return DataCompare(a, b, granularity, **kw).run().bitmap


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- compare
@pytest.mark.parametrize("granularity", [512, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("seed", [1, 2])
def test_qcow2_reference_exact(tmp_path: Path, granularity: int, seed: int) -> None:
    rnd = random.Random(seed)
    ref = qcow2(tmp_path / "ref.qcow2")
    apply_writes(ref, random_writes(rnd, SIZE, 20))
    img = tmp_path / "img.qcow2"
    shutil.copy(ref, img)
    apply_writes(img, random_writes(rnd, SIZE, 12))
    want = oracle(img, ref, granularity)
    got = rebuilt(img, ref, granularity)
    assert got == want
    assert want.count_bits() > 0  # the case is not trivial
    if granularity < 2 * MiB:
        assert want.count_bits() < want.bits


@pytest.mark.parametrize("granularity", [512, 64 * KiB, 2 * MiB])
def test_chain_image_and_chain_reference(tmp_path: Path, granularity: int) -> None:
    """The image and the reference are both overlays on a shared base (a restored chain)."""
    rnd = random.Random(granularity)
    base = qcow2(tmp_path / "base.qcow2")
    apply_writes(base, random_writes(rnd, SIZE, 15))
    ref = qcow2(tmp_path / "inc.qcow2", backing=base)
    apply_writes(ref, random_writes(rnd, SIZE, 8))
    img = tmp_path / "img.qcow2"
    shutil.copy(ref, img)  # same backing file name
    apply_writes(img, random_writes(rnd, SIZE, 8))
    assert rebuilt(img, ref, granularity) == oracle(img, ref, granularity)


@pytest.mark.parametrize("granularity", [512, 64 * KiB, 2 * MiB])
def test_raw_reference(tmp_path: Path, granularity: int) -> None:
    rnd = random.Random(granularity + 1)
    first = random_writes(rnd, SIZE, 15)
    ref = raw(tmp_path / "ref.raw")
    apply_writes(ref, first)
    img = qcow2(tmp_path / "img.qcow2")
    apply_writes(img, first)  # the same guest data, a different layout
    assert rebuilt(img, ref, granularity).count_bits() == 0
    apply_writes(img, random_writes(rnd, SIZE, 10))
    assert rebuilt(img, ref, granularity) == oracle(img, ref, granularity)


def test_identical_rewrites_are_not_marked(tmp_path: Path) -> None:
    """Allocation differs (the overlay now holds copies), data does not: nothing is dirty."""
    base = qcow2(tmp_path / "base.qcow2")
    apply_writes(base, [("data", 100_000, 2 * MiB, 5)])
    img = qcow2(tmp_path / "img.qcow2", backing=base)
    apply_writes(img, [("same", 0, 4 * MiB, 0), ("zero", 4 * MiB, 1 * MiB, 0)])
    assert rebuilt(img, base, 512).count_bits() == 0
    apply_writes(img, [("data", 3 * MiB + 700, 1, 9)])  # one byte
    bm = rebuilt(img, base, 512)
    assert list(bm.dirty_extents(0, SIZE)) == [(3 * MiB + 512, 512)]


def test_zero_on_both_sides_is_not_read(tmp_path: Path) -> None:
    # (2 MiB clusters: block status walks clusters, and this should take milliseconds)
    size = 64 << 30
    ref = qcow2(tmp_path / "ref.qcow2", size=size, cluster_size=2 * MiB)
    img = qcow2(tmp_path / "img.qcow2", size=size, cluster_size=2 * MiB)
    apply_writes(img, [("data", 33 << 30, 10, 1)])
    with open_image(str(img), readonly=True) as a, open_image(str(ref), readonly=True) as b:
        job = DataCompare(a, b, 64 * KiB)
        assert job.total == 2 * MiB  # one cluster to read of a 64 GiB disk
        result = job.run()
    assert result.skipped == size - 2 * MiB
    assert list(result.bitmap.dirty_extents(0, size)) == [(33 << 30, 64 * KiB)]


@pytest.mark.parametrize("chunk", [4 * KiB, 64 * KiB])
def test_granule_larger_than_chunk(tmp_path: Path, chunk: int) -> None:
    rnd = random.Random(chunk)
    ref = qcow2(tmp_path / "ref.qcow2", cluster_size=4 * KiB)
    apply_writes(ref, random_writes(rnd, SIZE, 20))
    img = tmp_path / "img.qcow2"
    shutil.copy(ref, img)
    apply_writes(img, random_writes(rnd, SIZE, 4))
    for gran in (512, 64 * KiB, 2 * MiB):
        assert rebuilt(img, ref, gran, chunk=chunk) == oracle(img, ref, gran)


def test_size_differences(tmp_path: Path) -> None:
    ref = qcow2(tmp_path / "ref.qcow2", size=3 * MiB)
    apply_writes(ref, [("data", 0, 3 * MiB, 1)])
    img = tmp_path / "img.qcow2"
    shutil.copy(ref, img)
    with open_qcow2(str(img)) as i:
        i.resize(3 * MiB + 5 * 512)  # grown by 2.5 KiB of zeros: the whole tail is new
    bm = rebuilt(img, ref, 64 * KiB)
    assert list(bm.dirty_extents(0, bm.size)) == [(3 * MiB, 5 * 512)]
    small = qcow2(tmp_path / "small.qcow2", size=2 * MiB)
    with open_qcow2(str(ref), readonly=True) as r, open_qcow2(str(small)) as s:
        s.write(0, r.read(0, 2 * MiB))
    assert rebuilt(small, ref, 64 * KiB).count_bits() == 0  # shrunk: nothing beyond to mark


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_writes(tmp_path_factory: pytest.TempPathFactory,
                                data: st.DataObject) -> None:
    d = tmp_path_factory.mktemp("prop")
    size = data.draw(st.integers(1, 40)) * 512 + data.draw(st.sampled_from([0, 3 * MiB]))
    gran = data.draw(st.sampled_from([512, 4 * KiB, 64 * KiB, 2 * MiB]))
    cs = data.draw(st.sampled_from([512, 64 * KiB]))
    write = st.tuples(st.sampled_from(["data", "zero", "same"]), st.integers(0, size - 1),
                      st.integers(1, 200 * KiB), st.integers(0, 1 << 20)).map(
        lambda w: (w[0], w[1], min(w[2], size - w[1]), w[3]))
    ref = qcow2(d / "ref.qcow2", size=size, cluster_size=cs)
    apply_writes(ref, data.draw(st.lists(write, max_size=6)))
    img = d / "img.qcow2"
    shutil.copy(ref, img)
    apply_writes(img, data.draw(st.lists(write, max_size=6)))
    assert rebuilt(img, ref, gran, chunk=64 * KiB) == oracle(img, ref, gran)


# ---------------------------------------------------------------- recover into the store
def crashed_image(tmp_path: Path, granularity: int) -> tuple[Path, Path]:
    """(image with bitmap 'b' left in_use after writes, the backup taken at its creation)."""
    rnd = random.Random(7)
    img = qcow2(tmp_path / "img.qcow2")
    apply_writes(img, random_writes(rnd, SIZE, 10))
    ref = tmp_path / "backup.qcow2"
    shutil.copy(img, ref)
    with open_qcow2(str(img), keep_bitmaps=True) as i:
        store = Qcow2BitmapStore(i)
        store.add("b", granularity)
        stale = DirtyBitmap(SIZE, granularity)
        stale.set(SIZE - 1, 1)  # stale bits from before: must not survive the rebuild
        store.store("b", stale)
        store.add("other", 64 * KiB)
        store.set_in_use(["b"], True)  # a writer started...
    apply_writes(img, random_writes(rnd, SIZE, 8), bitmaps=True)  # ...wrote and crashed
    return img, ref


@pytest.mark.parametrize("granularity", [512, 64 * KiB])
def test_recover_makes_the_bitmap_consistent(tmp_path: Path, granularity: int) -> None:
    img, ref = crashed_image(tmp_path, granularity)
    want = oracle(img, ref, granularity)
    assert not want.get(SIZE - 1)
    with open_for_bitmaps(str(img), readonly=False) as node:
        assert node.store is not None and node.store._get("b").in_use
        with pytest.raises(BitmapOperationError, match="inconsistent"):
            node.bitmaps.bits("b")
        out = io.StringIO()
        args = argparse.Namespace(reference=str(ref), reference_format=None, progress=False)
        apply_recover(node, "b", args, out)
        assert f"{want.count_bits()} granules" in out.getvalue()
        assert node.bitmaps.info("b").disk_state is DiskState.REBUILT
        assert node.bitmaps.bits("b") == want
    with open_qcow2(str(img), readonly=True) as i:
        store = Qcow2BitmapStore(i)
        sb = store._get("b")
        assert not sb.in_use and sb.entry.auto and sb.entry.granularity == granularity
        assert store.load("b") == want
        assert store.load("other").count_bits() == 0


def test_recover_on_a_consistent_bitmap_gives_the_same_result(tmp_path: Path) -> None:
    img, ref = crashed_image(tmp_path, 64 * KiB)
    with open_qcow2(str(img), keep_bitmaps=True) as i, \
            open_image(str(ref), readonly=True) as r:
        store = Qcow2BitmapStore(i)
        first = recover_bitmap(store, "b", r).bitmap
        second = recover_bitmap(store, "b", r).bitmap
        assert first == second == store.load("b")


def test_interrupted_run_changes_nothing_and_rerun_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img, ref = crashed_image(tmp_path, 512)
    before = digest(img)
    calls = 0
    real = DataCompare._compare

    def flaky(self: DataCompare, *a: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        real(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(DataCompare, "_compare", flaky)
    with open_qcow2(str(img), keep_bitmaps=True) as i, \
            open_image(str(ref), readonly=True) as r, pytest.raises(KeyboardInterrupt):
        recover_bitmap(Qcow2BitmapStore(i), "b", r)
    assert calls == 3
    assert digest(img) == before
    monkeypatch.setattr(DataCompare, "_compare", real)
    with open_qcow2(str(img), keep_bitmaps=True) as i, \
            open_image(str(ref), readonly=True) as r:
        recover_bitmap(Qcow2BitmapStore(i), "b", r)
    with open_qcow2(str(img), readonly=True) as i:
        assert Qcow2BitmapStore(i).load("b") == oracle(img, ref, 512)


def test_store_refuses_wrong_shape_and_missing(tmp_path: Path) -> None:
    img, ref = crashed_image(tmp_path, 64 * KiB)
    with open_qcow2(str(img), keep_bitmaps=True) as i, \
            open_image(str(ref), readonly=True) as r:
        store = Qcow2BitmapStore(i)
        with pytest.raises(BitmapOperationError, match="granularity"):
            store.replace_inconsistent("b", DirtyBitmap(SIZE, 512))
        with pytest.raises(BitmapOperationError, match="not found"):
            recover_bitmap(store, "nope", r)
        assert store._get("b").in_use  # unchanged by the refusals


def test_differing_granules_public_helper(tmp_path: Path) -> None:
    ref = raw(tmp_path / "r.raw", 1 * MiB)
    img = raw(tmp_path / "i.raw", 1 * MiB)
    apply_writes(img, [("data", 70 * KiB, 1, 3)])
    with open_image(str(img), readonly=True) as a, open_image(str(ref), readonly=True) as b:
        seen: list[int] = []
        bm = differing_granules(a, b, 64 * KiB, progress=seen.append)
    assert list(bm.dirty_extents(0, MiB)) == [(64 * KiB, 64 * KiB)]
    # only data is compared: the written granule and granule 0, which holds the first block
    # every new raw image has written (as qemu-img's have)
    assert sum(seen) == 128 * KiB


def test_cli_argument_checks() -> None:
    ns = argparse.Namespace(reference=None, reference_format=None)
    with pytest.raises(UsageError, match="needs --reference"):
        check_arguments(ns, {"recover"})
    with pytest.raises(UsageError, match="only supported with --recover"):
        check_arguments(argparse.Namespace(reference="x", reference_format=None), {"clear"})
    with pytest.raises(UsageError, match="--reference-format"):
        check_arguments(argparse.Namespace(reference=None, reference_format="raw"), set())


class _WithReadInto:
    """A driver offering ``read_into`` (the buffer-reusing read path of the compare)."""

    def __init__(self, inner: object):
        self._inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def read_into(self, offset: int, view: memoryview) -> None:
        self.calls += 1
        view[:] = self._inner.read(offset, len(view))  # type: ignore[attr-defined]


@pytest.mark.parametrize("granularity", [512, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("size", [SIZE, MiB + 3])  # an unaligned end: the last read is odd
def test_read_into_path_exact(tmp_path: Path, granularity: int, size: int) -> None:
    rnd = random.Random(size + granularity)
    ref = raw(tmp_path / "ref.raw", size)
    apply_writes(ref, random_writes(rnd, size, 10))
    img = tmp_path / "img.raw"
    shutil.copy(ref, img)
    apply_writes(img, [*random_writes(rnd, size, 6), ("data", size - 1, 1, 1)])
    with open_image(str(img), readonly=True) as a, open_image(str(ref), readonly=True) as b:
        wa, wb = _WithReadInto(a), _WithReadInto(b)
        got = DataCompare(wa, wb, granularity, chunk=64 * KiB).run().bitmap  # type: ignore[arg-type]
        assert wa.calls and wb.calls
    assert got == oracle(img, ref, granularity)
    assert got.get(size - 1)
