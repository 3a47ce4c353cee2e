"""Compressed writes: QEMU's stream formats, the descriptor, byte packing of host clusters
(qcow2_alloc_bytes) with refcounts, and the cases QEMU refuses or does worse."""

from __future__ import annotations

import itertools
import random
import struct
import zlib
from pathlib import Path

import pytest

import dirtybits
from dirtybits.block.checkpoint import CheckpointPolicy
from dirtybits.block.children import open_qcow2
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.block.raw import RawImage
from dirtybits.errors import UnsupportedFeatureError, UsageError
from dirtybits.format.qcow2.header import (
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    INCOMPAT_COMPRESSION,
)
from dirtybits.format.qcow2.tables import ClusterType, L2Entry, compressed_descriptor
from dirtybits.qcow2.check import check_image
from dirtybits.qcow2.compress import compress_cluster, compress_clusters
from dirtybits.qcow2.image import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB


def text(seed: int, n: int) -> bytes:
    r = random.Random(seed)
    words = [bytes(r.choices(b"abcdefghijklmnop", k=r.randint(2, 9))) for _ in range(300)]
    return b" ".join(r.choices(words, k=n // 3 + 1))[:n]


def entries(img: Qcow2Image, first: int, count: int) -> list[L2Entry]:
    return [L2Entry.decode(img._entry((first + i) * img.cluster_size), img.cluster_bits)
            for i in range(count)]


def clean(path: Path) -> None:
    res = check_image(str(path))
    assert (res.check_errors, res.corruptions, res.leaks) == (0, 0, 0), res.messages[:5]


# ---------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize(("host", "nbytes", "sectors"), [
    (0x50000, 1, 1), (0x50000, 512, 1), (0x50000, 513, 2), (0x50000 + 100, 412, 1),
    (0x50000 + 100, 413, 2), (0x50000 + 511, 2, 2), (0x5FFFF, 1, 1),
])
def test_descriptor_counts_sectors_as_qemu(host: int, nbytes: int, sectors: int) -> None:
    raw = compressed_descriptor(host, nbytes, 16)
    # QEMU: nb_csectors = last sector - first sector, stored in the bits above the offset
    assert raw == (1 << 62) | ((sectors - 1) << 54) | host
    e = L2Entry.decode(raw, 16)
    assert (e.type, e.host_offset, e.compressed_sectors, e.copied) == (
        ClusterType.COMPRESSED, host, sectors, False)
    start, length = e.compressed_range()
    assert start == host and start + length >= host + nbytes


def test_zlib_is_raw_deflate_with_a_4k_window() -> None:
    data = text(1, CS)
    out = compress_cluster(data, COMPRESSION_ZLIB, CS)
    assert out is not None and len(out) < CS - 1
    assert zlib.decompressobj(-12).decompress(out) == data  # what QEMU's inflateInit2 takes
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)  # QEMU's params
    assert out == c.compress(data) + c.flush()


def test_zstd_is_one_frame_with_its_content_size() -> None:
    import zstandard

    data = text(2, CS)
    out = compress_cluster(data, COMPRESSION_ZSTD, CS)
    assert out is not None and out[:4] == b"\x28\xb5\x2f\xfd"
    params = zstandard.get_frame_parameters(out)
    assert params.content_size == CS and not params.has_checksum
    assert zstandard.ZstdDecompressor().decompress(out) == data


@pytest.mark.parametrize("ctype", [COMPRESSION_ZLIB, COMPRESSION_ZSTD])
def test_what_does_not_fit_below_the_cluster_size_is_not_compressed(ctype: int) -> None:
    assert compress_cluster(random.Random(3).randbytes(CS), ctype, CS) is None
    # the partial last cluster is padded with zeros before compressing, as QEMU
    out = compress_cluster(b"x" * 100, ctype, CS)
    assert out is not None
    chunks: list[bytes | bytearray | memoryview] = [text(i, CS) for i in range(9)]
    assert list(compress_clusters(chunks, ctype, CS)) == [compress_cluster(c, ctype, CS)
                                                          for c in chunks]


# ---------------------------------------------------------------------------- packing
def test_clusters_are_packed_byte_by_byte_and_refcounted(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    Qcow2Image.create(str(p), 4 * MiB)
    data = b"".join(text(i, CS) for i in range(40))
    with open_qcow2(str(p)) as img:
        img.write(0, data, compress=True)
        ents = entries(img, 0, 40)
        assert all(e.type is ClusterType.COMPRESSED for e in ents)
        touching: dict[int, int] = {}
        for a, b in itertools.pairwise(ents):
            # the next piece starts where the last one ended (no sector alignment)
            assert a.host_offset < b.host_offset <= a.host_offset + a.compressed_range()[1]
        for e in ents:
            start, n = e.compressed_range()
            for c in range(start >> 16, (start + n - 1 >> 16) + 1):
                touching[c] = touching.get(c, 0) + 1
        assert max(touching.values()) > 1
        for c, n in touching.items():
            assert img.get_refcount(c) == n
        # pieces spill from one host cluster into the next, contiguous one
        assert any(e.host_offset >> 16 != (e.host_offset + e.compressed_range()[1] - 1) >> 16
                   for e in ents)
        assert img.read(0, len(data)) == data
    clean(p)


def test_no_packing_into_a_cluster_at_its_maximum_refcount(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    Qcow2Image.create(str(p), 1 * MiB, refcount_bits=1)
    data = b"".join(text(i, CS) for i in range(6))
    with open_qcow2(str(p)) as img:
        img.write(0, data, compress=True)
        hosts = [e.host_offset for e in entries(img, 0, 6)]
        assert all(h % CS == 0 for h in hosts) and len(set(hosts)) == 6
        assert img.read(0, len(data)) == data
    clean(p)


def test_a_freed_host_cluster_is_not_packed_into_after_reuse(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    Qcow2Image.create(str(p), 2 * MiB)
    with open_qcow2(str(p)) as img:
        img.write(0, text(1, CS), compress=True)  # alone in its host cluster
        host = entries(img, 0, 1)[0].host_offset
        img.discard(0, CS)
        img.flush()  # refcount 0: the cluster is free
        assert img.get_refcount(host >> 16) == 0
        plain = random.Random(2).randbytes(CS)
        img.write(CS, plain)  # reuses it whole
        assert img._entry(CS) & 0x00FFFFFFFFFFFE00 == host & ~0xFFFF
        img.write(2 * CS, text(3, CS), compress=True)
        assert entries(img, 2, 1)[0].host_offset >> 16 != host >> 16
        assert img.read(CS, 2 * CS) == plain + text(3, CS)
    clean(p)


# ---------------------------------------------------------------------------- requests
def test_whole_clusters_only_but_the_last_partial_one(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    size = 3 * CS + 4096
    Qcow2Image.create(str(p), size)
    with open_qcow2(str(p)) as img:
        for off, n in ((0, 4096), (4096, CS), (CS, CS + 512), (3 * CS, 512)):
            with pytest.raises(UsageError):
                img.write(off, text(0, n), compress=True)
        assert img._entry(0) == 0
        tail = text(5, 4096)
        img.write(3 * CS, tail, compress=True)
        assert entries(img, 3, 1)[0].type is ClusterType.COMPRESSED
        assert img.read(3 * CS, 4096) == tail
    clean(p)


def test_refused_with_a_data_file_and_on_raw(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    Qcow2Image.create(str(p), MiB, data_file="c.data")
    with open_qcow2(str(p)) as img, pytest.raises(UnsupportedFeatureError):
        img.write(0, text(0, CS), compress=True)
    r = tmp_path / "r.raw"
    RawImage.create(str(r), MiB)
    with RawImage(str(r)) as raw, pytest.raises(UnsupportedFeatureError):
        raw.write(0, text(0, CS), compress=True)


@pytest.mark.parametrize("before", ["plain", "compressed", "zero-alloc", "zero"])
def test_over_an_allocated_cluster_the_old_one_is_released(tmp_path: Path, before: str) -> None:
    """QEMU 7.2 refuses with EIO; here the old allocation is freed after the new entry."""
    p = tmp_path / "c.qcow2"
    Qcow2Image.create(str(p), MiB)
    with open_qcow2(str(p)) as img:
        if before == "compressed":
            img.write(0, text(9, 2 * CS), compress=True)
        else:
            img.write(0, random.Random(1).randbytes(2 * CS))
            if before.startswith("zero"):
                img.write_zeroes(0, 2 * CS, unmap=before == "zero")
        new = text(7, 2 * CS)
        img.write(0, new, compress=True)
        assert [e.type for e in entries(img, 0, 2)] == [ClusterType.COMPRESSED] * 2
        assert img.read(0, 2 * CS) == new
    clean(p)
    with open_qcow2(str(p), readonly=True) as img:
        assert img.read(0, 2 * CS) == new


def test_over_a_backing_file_and_uncompressible_data(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    Qcow2Image.create(str(base), MiB)
    with open_qcow2(str(base)) as b:
        b.write(0, b"\x11" * MiB)
    top = tmp_path / "top.qcow2"
    Qcow2Image.create(str(top), MiB, backing_file="base.qcow2", backing_format="qcow2",
                      compression_type="zstd")
    noise = random.Random(4).randbytes(CS)
    with open_qcow2(str(top)) as img:
        assert img.header.compression_type == COMPRESSION_ZSTD
        assert img.header.incompatible_features & INCOMPAT_COMPRESSION
        img.write(CS, text(1, CS) + noise, compress=True)
        kinds = [e.type for e in entries(img, 0, 3)]
        assert kinds == [ClusterType.UNALLOCATED, ClusterType.COMPRESSED, ClusterType.NORMAL]
        assert img.read(0, 4 * CS) == b"\x11" * CS + text(1, CS) + noise + b"\x11" * CS
    clean(top)


def test_zero_length_compressed_write_ends_the_file_on_a_sector(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    Qcow2Image.create(str(p), MiB)
    with open_qcow2(str(p)) as img:
        img.write(0, text(1, CS), compress=True)
        img.write(0, b"", compress=True)
    assert p.stat().st_size % 512 == 0
    clean(p)


def test_a_compressed_write_through_the_node_is_recorded(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    Qcow2Image.create(str(p), 8 * MiB)
    with open_qcow2(str(p), keep_bitmaps=True) as img:
        Qcow2BitmapStore(img).add("b", CS)
    policy = CheckpointPolicy(interval=None, idle=None, threshold_bits=None)
    with dirtybits.open(str(p), checkpoint=policy) as disk:
        disk.write(2 * CS, text(1, 3 * CS), compress=True)
    with open_qcow2(str(p), readonly=True) as img:
        bm = Qcow2BitmapStore(img).load("b")
        assert list(bm.dirty_extents(0, bm.size)) == [(2 * CS, 3 * CS)]
        assert [e.type for e in entries(img, 2, 3)] == [ClusterType.COMPRESSED] * 3
    clean(p)


def test_l2_entries_on_disk_after_close(tmp_path: Path) -> None:
    """What QEMU reads: the L2 entry in the file names the payload's sectors."""
    p = tmp_path / "c.qcow2"
    Qcow2Image.create(str(p), MiB)
    with open_qcow2(str(p)) as img:
        img.write(0, text(1, CS), compress=True)
        l2 = img._l1[0] & 0x00FFFFFFFFFFFE00
    raw = p.read_bytes()
    ent = L2Entry.decode(struct.unpack_from(">Q", raw, l2)[0], 16)
    start, n = ent.compressed_range()
    assert zlib.decompressobj(-12).decompress(raw[start:start + n], CS) == text(1, CS)


def _zstd_payload_range(p: Path) -> tuple[int, int]:
    with open_qcow2(str(p), readonly=True) as img:
        return entries(img, 0, 1)[0].compressed_range()


def test_damaged_zstd_frame_is_a_corrupt_image_not_a_traceback(tmp_path: Path) -> None:
    """Found by the image fuzzer: zstandard's own error escaped the engine."""
    from dirtybits.errors import CorruptImageError

    p = tmp_path / "z.qcow2"
    Qcow2Image.create(str(p), MiB, cluster_size=4096, compression_type="zstd")
    with open_qcow2(str(p)) as img:
        img.write(0, text(1, 4096), compress=True)
    start, n = _zstd_payload_range(p)
    with p.open("r+b") as f:
        f.seek(start + 4)
        f.write(b"\xff" * (n - 4))  # the magic stays, the frame header is garbage
    with open_qcow2(str(p), readonly=True) as img, pytest.raises(CorruptImageError):
        img.read(0, 4096)


def test_zstd_frame_claiming_more_than_a_cluster_is_not_expanded(tmp_path: Path) -> None:
    import zstandard

    p = tmp_path / "z.qcow2"
    Qcow2Image.create(str(p), MiB, cluster_size=4096, compression_type="zstd")
    with open_qcow2(str(p)) as img:
        img.write(0, random.Random(1).randbytes(2048) + bytes(2048), compress=True)
    start, n = _zstd_payload_range(p)
    bomb = zstandard.ZstdCompressor().compress(b"\x07" * (32 * MiB))
    assert len(bomb) <= n
    with p.open("r+b") as f:
        f.seek(start)
        f.write(bomb)
    with open_qcow2(str(p), readonly=True) as img:
        assert img.read(0, 4096) == b"\x07" * 4096  # as QEMU: the cluster's worth, no more


def test_snapshot_apply_ends_packing_into_a_freed_compressed_cluster(tmp_path: Path) -> None:
    """Found by the snapshot model: apply freed the host cluster compressed bytes were being
    packed into, a plain write reused it, and the next compressed write appended into that
    data cluster (refcount 2 under a COPIED entry; the snapshot table was overwritten next)."""
    p = str(tmp_path / "d.qcow2")
    cs = 4096
    Qcow2Image.create(p, 1 << 20, cluster_size=cs)
    with open_qcow2(p) as img:
        img.snapshot_create("a")
        img.write(0, b"\x01" * cs, compress=True)  # a few bytes into a fresh host cluster
        packing = img._comp_next
        assert packing
        img.snapshot_apply(0)  # frees that host cluster
        assert img._comp_next == 0
        img.write(0, b"\x02" * (1 << 20))
        img.write(0, b"\x03" * cs, compress=True)
    res = check_image(p)
    assert (res.corruptions, res.leaks) == (0, 0), res.messages
