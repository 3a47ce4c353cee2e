"""Compressed clusters written by dirtybits against QEMU 7.2, both directions, zlib and zstd.

- The same qemu-io command list (compressed and normal writes) on twin images QEMU created:
  same output, ``qemu-img check`` clean, ``qemu-img compare`` identical, the same map, and
  images as small as QEMU's (the packing is qcow2_alloc_bytes').
- ``dirtybits convert -c`` against ``qemu-img convert -c``: with zlib the very same file
  (same zlib, same parameters, in-order writes); with zstd (another libzstd version) the same
  guest data; both read back by qemu-img / qemu-io, and ``dirtybits map`` agrees with
  ``qemu-img map`` about the compressed extents.
- Errors as qemu-io's: misaligned (Invalid argument), external data file and raw (Operation
  not supported). Over an allocated cluster QEMU 7.2 fails (Input/output error) where
  dirtybits releases the old cluster: the result equals QEMU's ``write -z -u`` + ``write -c``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from peers import db, sh

pytestmark = pytest.mark.interop

MiB = 1 << 20


def text(seed: int, n: int) -> bytes:
    r = random.Random(seed)
    words = [bytes(r.choices(b"etaoinshrdlu ", k=r.randint(2, 9))) for _ in range(400)]
    return b" ".join(r.choices(words, k=n // 3 + 1))[:n]


def io_lines(out: str) -> list[str]:
    """qemu-io's output without the timing lines."""
    return [ln for ln in out.splitlines() if "ops/sec" not in ln]


def end_offset(img: Path) -> int:
    out = sh("qemu-img", "check", img).stdout
    assert "No errors were found on the image." in out, out
    m = re.search(r"Image end offset: (\d+)", out)
    assert m, out
    return int(m[1])


def qmap(img: Path) -> list[dict[str, object]]:
    return list(json.loads(sh("qemu-img", "map", "--output=json", img).stdout))


def make_inputs(d: Path) -> None:
    (d / "t.txt").write_bytes(text(1, 40000))
    (d / "rnd.bin").write_bytes(random.Random(2).randbytes(65536))


@pytest.mark.parametrize(("ctype", "cluster"), [("zlib", "65536"), ("zstd", "65536"),
                                                ("zlib", "4096"), ("zstd", "512")])
def test_same_commands_same_image_as_qemu_io(tmp_path: Path, ctype: str, cluster: str) -> None:
    make_inputs(tmp_path)
    cs = int(cluster)
    size = 64 * cs + cs // 2 if cs > 512 else 64 * cs  # a partial last cluster when it can
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o",
       f"compression_type={ctype},cluster_size={cluster}", q, str(size))
    d.write_bytes(q.read_bytes())
    last = size // cs * cs
    cmds = [f"write -c -P 0x11 0 {2 * cs}", f"write -P 0x22 {2 * cs} {cs}",
            f"write -c -s {tmp_path / 't.txt'} {4 * cs} {6 * cs}",
            f"write -c -s {tmp_path / 'rnd.bin'} {10 * cs} {cs}",  # stored uncompressed
            f"write -z {12 * cs} {cs}", f"write -z -u 0 {cs}",
            f"write -c -P 0x33 0 {cs}",  # a zero cluster (no host cluster) may be compressed
            f"write -c -s {tmp_path / 't.txt'} {last - cs} {size - last + cs}",  # to the end
            f"write -c -P 0x44 {20 * cs} {8 * cs}",
            f"read -P 0x33 0 {cs}", f"read -P 0x22 {2 * cs} {cs}"]
    argv = [a for c in cmds for a in ("-c", c)]
    theirs = sh("qemu-io", *argv, q)
    ours = db("io", *argv, d)
    assert io_lines(ours.stdout) == io_lines(theirs.stdout)
    sh("qemu-img", "compare", q, d)
    assert qmap(d) == qmap(q)
    # the same packing: QEMU's parallel tasks may take the pieces in another order, not space
    assert abs(end_offset(d) - end_offset(q)) <= (cs if ctype == "zlib" else 4 * cs)
    assert d.stat().st_size <= q.stat().st_size + cs
    # and each tool reads what the other wrote
    db("io", "-r", "-c", f"read -P 0x44 {20 * cs} {8 * cs}", "-c", f"read -P 0x11 {cs} {cs}", q)
    sh("qemu-io", "-r", "-c", f"read -P 0x44 {20 * cs} {8 * cs}", "-c",
       f"read -P 0x11 {cs} {cs}", d)


def _mixed_raw(path: Path, clusters: int) -> None:
    r = random.Random(5)
    with path.open("wb") as f:
        for i in range(clusters):
            kind = i % 4
            if kind == 0:
                f.write(bytes(65536))
            elif kind == 1:
                f.write(r.randbytes(65536))
            else:
                f.write(text(i, 65536))
        f.write(text(99, 1000))  # a partial last cluster
    with path.open("r+b") as f:
        f.truncate((clusters * 65536 + 1000 + 511) // 512 * 512)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_convert_c_as_qemu_img(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.raw"
    _mixed_raw(src, 80)
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    opts = ["-o", f"compression_type={ctype}"]
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", *opts, src, q)
    db("convert", "-c", "-f", "raw", "-O", "qcow2", *opts, src, d)
    if ctype == "zlib":
        assert d.read_bytes() == q.read_bytes()
    else:
        assert abs(d.stat().st_size - q.stat().st_size) <= q.stat().st_size // 50
    end_offset(d)
    sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, d)
    back = tmp_path / "back.raw"
    sh("qemu-img", "convert", "-O", "raw", d, back)
    assert back.read_bytes() == src.read_bytes()
    # the compressed extents: data without a host offset in both tools' maps
    ours = json.loads(db("map", "--output=json", d).stdout)
    assert ours == qmap(d)
    assert any(e["data"] and "offset" not in e for e in ours)
    info = json.loads(sh("qemu-img", "info", "--output=json", d).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype


def test_convert_c_skips_zero_clusters_and_takes_minus_n(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    _mixed_raw(src, 16)
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    size = str(src.stat().st_size)
    for img in (q, d):
        sh("qemu-img", "create", "-q", "-f", "qcow2", img, size)
        sh("qemu-io", "-c", "write -P 0x55 0 1M", img)  # -n: the target holds data already
    sh("qemu-img", "convert", "-n", "-c", "-f", "raw", "-O", "qcow2", src, q, ok=(0, 1))
    db("convert", "-n", "-c", "-f", "raw", "-O", "qcow2", src, d)
    # QEMU 7.2 fails on the allocated clusters (EIO); ours replaces them
    sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, d)
    end_offset(d)


def test_errors_as_qemu_io(tmp_path: Path) -> None:
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", q, "1M")
    d.write_bytes(q.read_bytes())
    cmds = ["write -c 0 4k", "write -c 4k 64k", "write -c 64k 96k", "write -c 0 0"]
    argv = [a for c in cmds for a in ("-c", c)]
    theirs = sh("qemu-io", *argv, q, ok=(0, 1))
    ours = db("io", *argv, d, ok=(0, 1))
    assert (ours.returncode, io_lines(ours.stdout)) == (theirs.returncode,
                                                         io_lines(theirs.stdout))
    for fmt, name, create in (("qcow2", "df.qcow2", ["-o", f"data_file={tmp_path}/df.data"]),
                              ("raw", "r.raw", [])):
        sh("qemu-img", "create", "-q", "-f", fmt, *create, tmp_path / name, "1M")
        theirs = sh("qemu-io", "-f", fmt, "-c", "write -c 0 64k", tmp_path / name, ok=(0, 1))
        ours = db("io", "-f", fmt, "-c", "write -c 0 64k", tmp_path / name, ok=(0, 1))
        assert ours.stdout == theirs.stdout == "write failed: Operation not supported\n"


def test_over_allocated_clusters_we_do_better(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(text(3, 30000))
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", q, "2M")
    d.write_bytes(q.read_bytes())
    first = ["write -P 1 0 128k", "write -c -P 2 128k 128k", "write -z 256k 64k"]
    over = f"write -c -s {tmp_path / 't.txt'} 0 320k"
    out = sh("qemu-io", *[a for c in [*first, over] for a in ("-c", c)], q, ok=(1,)).stdout
    assert "write failed: Input/output error" in out  # QEMU 7.2
    sh("qemu-io", "-c", "write -z -u 0 320k", "-c", over, q)
    db("io", *[a for c in [*first, over] for a in ("-c", c)], d)
    sh("qemu-img", "compare", q, d)
    assert end_offset(d) <= end_offset(q) + 3 * 65536  # the old clusters are free again
    assert qmap(d) == qmap(q)
