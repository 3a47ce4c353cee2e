"""Bitmap reporting: dirty counts, ``info --dirty``, damaged bitmaps in ``info``, the PNG.

Counts are checked against a plain Python set-of-granules oracle on hand-built tables (data,
all-zero and all-ones entries, garbage past the last bit, a disk size that is not a multiple
of the granularity). Images are made with dirtybits' own engine and bitmap store, then damaged
by patching bytes, so no QEMU tool is needed here (tests/interop has the QEMU side).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.cli.bitmap_png import CLEAN, DARK, plan_grid, render_png
from dirtybits.cli.info import dump_human, qemu_json
from dirtybits.format.qcow2.bitmaps import BitmapsExtension
from dirtybits.format.qcow2.header import EXT_BITMAPS, HeaderCluster
from dirtybits.qcow2.bitmap_scan import count_dirty
from dirtybits.qcow2.image import Qcow2Image
from dirtybits.qcow2.info import dirty_percent, image_info
from peers import db

PIL = pytest.importorskip("PIL.Image")

KiB, MiB = 1024, 1 << 20


# --------------------------------------------------------------------------- counting
def oracle_bytes(dirty: set[int], granularity: int, size: int) -> int:
    """Dirty bytes inside the disk: each dirty granule, the last clipped to the disk end."""
    return sum(min(granularity, size - g * granularity) for g in dirty)


def build_table(dirty: set[int], bits: int, cluster: int, *, ones: set[int] = frozenset(),
                tail_garbage: bool = False) -> tuple[list[int], Callable[[int, int], bytes]]:
    """A bitmap table over an in-memory file: clusters in ``ones`` become all-ones entries
    (their bits are added to ``dirty``), clusters with no dirty bit zero entries."""
    per = cluster * 8
    n = -(-bits // per)
    for i in ones:
        dirty |= set(range(i * per, min(bits, (i + 1) * per)))
    mem: dict[int, bytes] = {}
    table = []
    for i in range(n):
        if i in ones:
            table.append(1)
            continue
        buf = bytearray(cluster)
        for b in dirty:
            if i * per <= b < (i + 1) * per:
                k = b - i * per
                buf[k // 8] |= 1 << (k % 8)
        if tail_garbage and i == n - 1:
            valid = bits - i * per
            for k in range(valid, per):
                buf[k // 8] |= 1 << (k % 8)
        if not any(buf):
            table.append(0)
            continue
        off = (i + 1) * 0x100000
        mem[off] = bytes(buf)
        table.append(off)

    def pread(offset: int, length: int) -> bytes:
        for base, data in mem.items():
            if base <= offset < base + len(data):
                chunk = data[offset - base:offset - base + length]
                return chunk + bytes(length - len(chunk))
        return bytes(length)

    return table, pread


@pytest.mark.parametrize("seed", range(12))
def test_count_matches_oracle(seed: int) -> None:
    rnd = random.Random(seed)
    cluster = rnd.choice([512, 1024, 4096])
    gran = rnd.choice([512, 4096, 65536])
    size = rnd.randrange(1, 3 * cluster * 8) * gran - rnd.choice([0, 1, 511, gran // 2])
    size = max(size, 1)
    bits = -(-size // gran)
    dirty = {rnd.randrange(bits) for _ in range(rnd.randrange(0, 40))}
    if rnd.random() < 0.5:
        dirty.add(bits - 1)  # the partial last granule
    n = -(-bits // (cluster * 8))
    ones = {rnd.randrange(n)} if rnd.random() < 0.4 else set()
    table, pread = build_table(dirty, bits, cluster, ones=ones, tail_garbage=seed % 3 == 0)
    assert count_dirty(table, gran, size, cluster, pread) == oracle_bytes(dirty, gran, size)


def test_count_clips_the_last_granule() -> None:
    # 1,000,000 bytes at 64 KiB: 16 granules, the last one 16,960 bytes long.
    size, gran = 1_000_000, 65536
    table, pread = build_table({15}, 16, 512)
    assert count_dirty(table, gran, size, 512, pread) == size - 15 * gran
    table, pread = build_table({0, 15}, 16, 512)
    assert count_dirty(table, gran, size, 512, pread) == size - 14 * gran


def test_all_ones_entries_count_without_reading() -> None:
    cluster, gran = 512, 512
    bits = 3 * cluster * 8 - 100  # the last cluster is partial
    size = bits * gran - 7
    reads: list[tuple[int, int]] = []

    def pread(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return bytes(length)

    table = [1, 0, 1]
    expected = oracle_bytes(set(range(cluster * 8)) | set(range(2 * cluster * 8, bits)),
                            gran, size)
    assert count_dirty(table, gran, size, cluster, pread) == expected
    assert reads == []  # zero and all-ones entries read nothing


def test_contiguous_data_clusters_are_read_together() -> None:
    cluster, gran = 512, 512
    bits = 4 * cluster * 8
    reads: list[tuple[int, int]] = []

    def pread(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return b"\x01" * length

    table = [0x10000, 0x10200, 0x10400, 0x20000]
    assert count_dirty(table, gran, bits * gran, cluster, pread) == 4 * cluster * gran
    assert sorted(reads) == [(0x10000, 3 * cluster), (0x20000, cluster)]


@pytest.mark.parametrize(("dirty", "size", "text"), [
    (0, 100, "0.00"), (1, 10**9, "0.01"), (10**9 - 1, 10**9, "99.99"), (100, 100, "100.00"),
    (1234, 10000, "12.34"), (12345, 100000, "12.35"), (5, 0, "0.00"),
])
def test_dirty_percent_is_fixed_point(dirty: int, size: int, text: str) -> None:
    assert str(dirty_percent(dirty, size)) == text


def test_qemu_json_prints_fixed_point_and_qemu_doubles() -> None:
    assert qemu_json({"p": Decimal("1.50")}) == '{\n    "p": 1.50\n}'
    assert qemu_json(0.1) == "0.10000000000000001"  # QEMU's %.17g


# --------------------------------------------------------------------------- images
def make_image(path: Path, size: int = 8 * MiB, cluster: int = 65536,
               bitmaps: tuple[tuple[str, int], ...] = (("b0", 65536), ("b1", 4096))) -> None:
    Qcow2Image.create(str(path), size, cluster_size=cluster)
    with Qcow2Image.open(str(path), keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        for name, gran in bitmaps:
            store.add(name, gran)


def set_bits(path: Path, name: str, ranges: list[tuple[int, int]]) -> DirtyBitmap:
    with Qcow2Image.open(str(path), keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        bm = store.load(name)
        for off, length in ranges:
            bm.set(off, length)
        store.store(name, bm)
        return bm


def directory_offset(path: Path) -> int:
    with open(path, "rb") as f:
        hc = HeaderCluster.unpack(f.read(65536))
    ext = hc.extension(EXT_BITMAPS)
    assert ext is not None
    return BitmapsExtension.unpack(ext.data).bitmap_directory_offset


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def entry_offsets(path: Path) -> list[int]:
    """File offsets of each directory entry."""
    d = directory_offset(path)
    with open(path, "rb") as f:
        f.seek(d)
        raw = f.read(4096)
    out, pos = [], 0
    while pos + 24 <= len(raw) and raw[pos:pos + 24] != bytes(24):
        name_size, extra = struct.unpack_from(">HI", raw, pos + 18)
        out.append(d + pos)
        pos += (24 + name_size + extra + 7) & ~7
    return out


def bitmaps_of(info: dict[str, object]) -> list[dict[str, object]]:
    data = info["format-specific"]["data"]  # type: ignore[index]
    return list(data.get("bitmaps", []))  # type: ignore[union-attr]


def test_info_dirty_json_and_human(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    size = 8 * MiB
    make_image(path, size)
    set_bits(path, "b0", [(0, 1), (3 * MiB, 200 * KiB)])
    plain = image_info(str(path))
    assert all(set(b) == {"name", "granularity", "flags"} for b in bitmaps_of(plain))
    info = image_info(str(path), dirty=True)
    b0, b1 = bitmaps_of(info)
    # 0..64K, and 3M..3M+200K rounded out to 64 KiB granules (3M .. 3M+256K).
    assert b0["dirty-bytes"] == 64 * KiB + 256 * KiB
    assert b0["dirty-percent"] == Decimal("3.91")
    assert (b1["dirty-bytes"], b1["dirty-percent"]) == (0, Decimal("0.00"))
    text = qemu_json(info)
    parsed = json.loads(text)
    assert bitmaps_of(parsed)[0]["dirty-percent"] == pytest.approx(3.91)
    human = dump_human(info).splitlines()
    i = human.index("            name: b0")
    block = human[i - 2:i + 3]
    assert block[-1] == "            dirty: 320 KiB (327680 bytes, 3.91%)"
    assert dump_human(plain) == "".join(
        line + "\n" for line in human if "dirty:" not in line)


def test_info_dirty_on_in_use_bitmap_says_inconsistent(tmp_path: Path) -> None:
    path = tmp_path / "u.qcow2"
    make_image(path)
    first = entry_offsets(path)[0]
    poke(path, first + 12, struct.pack(">I", 3))  # flags: in_use | auto
    info = image_info(str(path), dirty=True)
    b0 = bitmaps_of(info)[0]
    assert b0["inconsistent"] is True and "dirty-bytes" not in b0
    assert "dirty: unknown (inconsistent" in dump_human(info)


def test_info_dirty_without_flag_reads_no_bitmap_data(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.qcow2"
    make_image(path)
    set_bits(path, "b0", [(0, MiB)])
    from dirtybits.qcow2 import info as info_mod

    called: list[int] = []
    monkeypatch.setattr(info_mod, "count_dirty", lambda *a, **k: called.append(1) or 0)
    image_info(str(path))
    assert called == []
    image_info(str(path), dirty=True)
    assert called == [1, 1]


DAMAGE = {
    # (what to poke relative to the second entry, expected reason fragment)
    "granularity": (17, bytes([40]), "granularity_bits 40"),
    "reserved-flag": (12, struct.pack(">I", 0x10), "reserved flags"),
    "table-size": (8, struct.pack(">I", 7), "bitmap_table_size 7"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_info_lists_damaged_entry_as_unusable(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "g.qcow2"
    make_image(path)
    at, data, reason = DAMAGE[kind]
    poke(path, entry_offsets(path)[1] + at, data)
    info = image_info(str(path), dirty=True)
    b0, b1 = bitmaps_of(info)
    assert "unusable" not in b0 and b0["dirty-bytes"] == 0
    assert reason in str(b1["unusable"]) and "dirty-bytes" not in b1
    assert f"            unusable: {b1['unusable']}\n" in dump_human(info)


def test_info_lists_damaged_table_as_unusable(tmp_path: Path) -> None:
    path = tmp_path / "t.qcow2"
    make_image(path)
    set_bits(path, "b1", [(0, MiB)])
    table = struct.unpack(">Q", (path.read_bytes()[entry_offsets(path)[1]:][:8]))[0]
    poke(path, table, struct.pack(">Q", 0x10000 | 0x200))  # unaligned data cluster
    b1 = bitmaps_of(image_info(str(path)))[1]
    assert "bitmap table" in str(b1["unusable"]) and "unaligned" in str(b1["unusable"])


def test_info_reports_unreadable_directory(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    make_image(path)
    with open(path, "rb") as f:
        head = f.read(65536)
    i = head.find(struct.pack(">I", EXT_BITMAPS))
    poke(path, i + 8, struct.pack(">I", 3))  # nb_bitmaps 3, the directory holds 2
    info = image_info(str(path))
    data = info["format-specific"]["data"]
    assert "bitmaps" not in data
    assert "Less bitmaps found" in data["bitmaps-unusable"]
    assert "    bitmaps unusable: " in dump_human(info)


def test_cli_info_dirty_flag(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    make_image(path)
    set_bits(path, "b1", [(4096, 4096)])
    out = db("info", "--dirty", "--output=json", path).stdout
    assert [b.get("dirty-bytes") for b in bitmaps_of(json.loads(out))] == [0, 4096]


# --------------------------------------------------------------------------- the picture
def test_png_cells_and_legend(tmp_path: Path) -> None:
    from PIL import Image

    size, gran = 64 * MiB, 65536
    bm = DirtyBitmap(size, gran)
    bm.set(10 * MiB, 2 * MiB)  # a fully dirty region
    bm.set(40 * MiB, gran)  # one granule: a partly dirty cell
    out = tmp_path / "b.png"
    layout = render_png(bm, str(out), title="test")
    assert layout.cells * layout.bits_per_cell >= bm.bits
    img = Image.open(out).convert("RGB")
    assert img.size == (layout.width, layout.height)

    def pixel(offset: int) -> tuple[int, int, int]:
        x0, y0, x1, y1 = layout.cell_box(offset // layout.cell_bytes)
        return img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))  # type: ignore[return-value]

    full, part, clean = pixel(11 * MiB), pixel(40 * MiB), pixel(30 * MiB)
    assert clean == CLEAN
    assert full != CLEAN and full[0] > full[1] + 100  # red
    assert part != CLEAN and part[0] > part[2]
    if layout.cell_bytes > gran:
        assert sum(part) > sum(full)  # lighter: a smaller dirty fraction
    # The legend: dark text pixels below the grid.
    import numpy as np

    legend = np.asarray(img.crop((0, layout.legend_y, layout.width, layout.height)).convert("L"))
    assert (legend < 60).sum() > 500  # a few lines of text, not a stray pixel


def test_png_grid_of_a_16_tib_disk_is_bounded() -> None:
    per, cells, columns, rows = plan_grid((16 << 40) // 65536, 65536)
    assert (columns, rows) == (256, 256) and per * cells == (16 << 40) // 65536
    per, cells, columns, rows = plan_grid(16, 65536)
    assert (per, cells, columns, rows) == (1, 16, 16, 1)


def test_png_partial_last_cell_counts_its_own_bits(tmp_path: Path) -> None:
    from PIL import Image

    size, gran = 100_000_000, 512  # 195313 granules: 4 per cell, 1 in the last cell
    bm = DirtyBitmap(size, gran)
    bm.set(size - 1, 1)
    bm.set(0, gran)
    layout = render_png(bm, str(tmp_path / "p.png"), title="t")
    assert (layout.bits_per_cell, layout.cells) == (4, 48829)
    img = Image.open(tmp_path / "p.png").convert("RGB")
    x0, y0, _, _ = layout.cell_box(layout.cells - 1)
    assert img.getpixel((x0 + 1, y0 + 1)) == DARK  # its only granule is dirty: all dirty
    x0, y0, _, _ = layout.cell_box(0)
    assert img.getpixel((x0 + 1, y0 + 1)) not in (DARK, CLEAN)  # 1 of 4 granules


def test_cli_png_refuses_damaged_and_inconsistent(tmp_path: Path) -> None:
    path = tmp_path / "g.qcow2"
    make_image(path)
    entries = entry_offsets(path)
    poke(path, entries[0] + 12, struct.pack(">I", 3))  # b0 in use
    poke(path, entries[1] + 17, bytes([40]))  # b1 damaged
    for name, word in (("b0", "inconsistent"), ("b1", "damaged")):
        png = tmp_path / f"{name}.png"
        proc = db("bitmap", "--png", png, path, name, ok=None)
        assert proc.returncode == 1 and word in proc.stderr and not png.exists()


def test_cli_png_writes_a_png(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "d.qcow2"
    make_image(path)
    set_bits(path, "b0", [(0, MiB)])
    png = tmp_path / "b0.png"
    db("bitmap", "--png", png, path, "b0")
    assert Image.open(png).format == "PNG"
