"""``create``, ``map``, ``compare``, ``convert`` and their shared option parsing, in-process.

Expected texts are qemu-img 7.2's (checked against the real tool in
``tests/interop/test_cli_vs_qemu_img.py``); here they pin the behaviour without QEMU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dirtybits.block import options as o
from dirtybits.block.children import open_qcow2
from dirtybits.block.raw import RawImage
from dirtybits.cli.main import main
from dirtybits.cli.options import cvtnum
from dirtybits.errors import UsageError
from dirtybits.qcow2.image import Qcow2Image

KiB, MiB = 1024, 1024 * 1024


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def qcow2(path: Path, size: int = 4 * MiB, **kw: object) -> Path:
    Qcow2Image.create(str(path), size, **kw)  # type: ignore[arg-type]
    return path


def write(path: Path, *ops: tuple[str, int, int, int]) -> None:
    """("w", offset, length, byte); ("z"|"u"|"d", offset, length, 0): write zeroes (and
    unmap), discard."""
    with open_qcow2(str(path)) as img:
        for op, off, n, byte in ops:
            if op == "w":
                img.write(off, bytes([byte]) * n)
            elif op in "zu":
                img.write_zeroes(off, n, unmap=op == "u")
            else:
                img.discard(off, n)


def map_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> list[dict[str, object]]:
    rc, out, err = cli(capsys, "map", "--output=json", *argv)
    assert rc == 0, err
    entries: list[dict[str, object]] = json.loads(out)
    return entries


# ---------------------------------------------------------------------------- options


def test_option_list_split_escapes_flags_and_no_prefix() -> None:
    assert o.split_option_list("a=1,b=x,,y,lazy,nocow,c=") == [
        ("a", "1"), ("b", "x,y"), ("lazy", "on"), ("cow", "off"), ("c", "")]


@pytest.mark.parametrize("text", ["", ",", "a=1,", ",a=1", "a=1,,,"])
def test_option_list_syntax_errors(text: str) -> None:
    with pytest.raises(o.QemuError) as exc:
        o.check_option_list(text)
    assert exc.value.lines == [f"Invalid option list: {text}"]


def test_option_list_accepts_escaped_trailing_comma() -> None:
    o.check_option_list("backing_file=a,,")


def test_opts_print_in_list_order_with_defaults_numbers_and_escapes() -> None:
    opts = o.QemuOpts(o.create_opts("qcow2"))
    opts.parse("backing_file=a,,b,lazy_refcounts=yes,cluster_size=4k,cluster_size=0x2000")
    opts.set_number("size", 1536)
    assert opts.format() == (
        "cluster_size=8192 extended_l2=off compression_type=zlib size=1536 "
        "backing_file=a,,b lazy_refcounts=yes refcount_bits=16")
    assert opts.get("lazy_refcounts") is True
    assert opts.get("backing_file") == "a,b"


@pytest.mark.parametrize(("text", "lines", "hint"), [
    ("foo=1", ["Invalid parameter 'foo'"], ""),
    ("cluster_size=4x", ["Parameter 'cluster_size' expects a non-negative number below 2^64"],
     "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
     "and exabytes, respectively.\n"),
    ("size=20E", ["Value '20E' is out of range for parameter 'size'"], ""),
    ("refcount_bits=x", ["Parameter 'refcount_bits' expects a number"], ""),
    ("lazy_refcounts=maybe", ["Parameter 'lazy_refcounts' expects 'on' or 'off'"], ""),
])
def test_opts_type_errors(text: str, lines: list[str], hint: str) -> None:
    with pytest.raises(o.QemuError) as exc:
        o.QemuOpts(o.create_opts("qcow2")).parse(text)
    assert (exc.value.lines, exc.value.hint) == (lines, hint)


def test_number_options_take_c_bases_and_wrap_negative() -> None:
    opts = o.QemuOpts(o.create_opts("qcow2"))
    opts.parse("refcount_bits=010")
    assert opts.get("refcount_bits") == 8
    opts.parse("refcount_bits=-1")
    assert "refcount_bits=-1" in opts.format()


def test_cvtnum_messages() -> None:
    assert cvtnum("image size", "1.5k") == 1536
    with pytest.raises(o.QemuError) as exc:
        cvtnum("image size", "1x")
    assert exc.value.lines == [
        "Invalid image size specified. You may use k, M, G, T, P or E suffixes for",
        "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."]
    with pytest.raises(o.QemuError) as exc:
        cvtnum("image size", "99E")
    assert exc.value.lines == [
        "Invalid image size specified. Must be between 0 and 9223372036854775807."]


def test_option_help_pads_like_qemu() -> None:
    text = o.option_help("raw", None)
    assert text.startswith("Supported raw options:\n  size=<size>            - Virtual disk size\n")
    assert text.endswith("Specify the target filename to include those options.\n")
    lines = o.option_help("qcow2", "x.qcow2").splitlines()
    assert lines[0] == "Supported options:"
    assert "  compression_type=<str> - Compression method used for image cluster compression" \
        in lines
    assert "  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)" in lines


def _args(text: str) -> o.Qcow2Create:
    opts = o.QemuOpts(o.create_opts("qcow2"))
    opts.parse(text)
    opts.set_number("size", MiB)
    return o.qcow2_create_args(opts)


@pytest.mark.parametrize(("text", "message"), [
    # the first failing check wins, in QEMU's order
    ("compat=foo,preallocation=y,compression_type=x",
     "Parameter 'version' does not accept value 'foo'"),
    ("preallocation=y,compression_type=x", "Parameter 'preallocation' does not accept value 'y'"),
    ("cluster_size=1000,compat=0.10,refcount_bits=3",
     "Cluster size must be a power of two between 512 and 2048k"),
    ("compat=0.10,lazy_refcounts=on", "Lazy refcounts only supported with compatibility level "
     "1.1 and above (use version=v3 or greater)"),
    ("refcount_bits=128", "Refcount width must be a power of two and may not exceed 64 bits"),
    ("data_file_raw=on", "data-file-raw requires data-file"),
    ("backing_fmt=qcow2", "Backing format cannot be used without backing file"),
    ("encryption=on", "encrypted qcow2 images are not supported"),
    ("preallocation=metadata", "preallocation=metadata is not supported for qcow2 (only off)"),
    ("nocow=on", "nocow=on is not supported"),
])
def test_qcow2_create_checks(text: str, message: str) -> None:
    with pytest.raises(o.QemuError) as exc:
        _args(text)
    assert exc.value.lines == [message]


def test_qcow2_create_size_limit_follows_l1_table(tmp_path: Path) -> None:
    """QEMU's 32 MiB L1 limit is the engine's (so every create path has it), checked before
    any file is touched: 128 GiB of 512-byte clusters is the largest image."""
    for size in (128 << 30) + 512, 1 << 60:
        path = tmp_path / "big.qcow2"
        with pytest.raises(UsageError) as exc:
            Qcow2Image.create(str(path), size, cluster_size=512)
        assert str(exc.value) == ("The image size is too large for file format 'qcow2' "
                                  "(try using a larger cluster size)")
        assert not path.exists()


def test_qcow2_create_args_map_compat_and_round_size() -> None:
    opts = o.QemuOpts(o.create_opts("qcow2"))
    opts.parse("compat=v2,encryption=off,size=1025")
    c = o.qcow2_create_args(opts)
    assert (c.compat, c.size, c.cluster_size, c.refcount_bits) == ("0.10", 1536, 65536, 16)


# ---------------------------------------------------------------------------- create


def test_create_prints_formatting_and_makes_image(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "a.qcow2"
    rc, out, err = cli(capsys, "create", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on",
                       img, "1G")
    assert (rc, err) == (0, "")
    assert out == (f"Formatting '{img}', fmt=qcow2 cluster_size=4096 extended_l2=off "
                   "compression_type=zlib size=1073741824 lazy_refcounts=on refcount_bits=16\n")
    with open_qcow2(str(img), readonly=True) as q:
        assert (q.size, q.cluster_size) == (1 << 30, 4096)
        assert q.header.compatible_features & 1


def test_create_size_from_backing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    qcow2(tmp_path / "base.qcow2", 3 * MiB)
    top = tmp_path / "top.qcow2"
    rc, out, _ = cli(capsys, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                     top)
    assert (rc, out) == (0, "")
    with open_qcow2(str(top), readonly=True) as q:
        assert q.size == 3 * MiB
        assert (q.hc.backing_file, q.hc.backing_format) == ("base.qcow2", "qcow2")


@pytest.mark.parametrize(("argv", "err"), [
    (["-f", "qcow2", "IMG"], "IMG: Image creation needs a size parameter\n"),
    (["-f", "qcow2", "-o", "foo=bar", "IMG", "1M"], "IMG: Invalid parameter 'foo'\n"),
    (["-f", "qcow2", "-b", "base.qcow2", "IMG"],
     "IMG: Backing file specified without backing format\n"),
    (["-f", "qcow2", "-b", "nope", "-F", "qcow2", "IMG"],
     "IMG: Could not open 'DIR/nope': No such file or directory\n"),
    (["-f", "raw", "-b", "base.qcow2", "-F", "qcow2", "IMG"],
     "IMG: Backing file not supported for file format 'raw'\n"),
    (["-f", "qcow2", "-o", "size=2M", "IMG", "1M"],
     "IMG: The image size must be specified only once\n"),
    (["-f", "foo", "IMG", "1M"], "IMG: Unknown file format 'foo'\n"),
    (["-f", "qcow2", "IMG", "1x"], "Invalid image size specified. You may use k, M, G, T, P or E"
     " suffixes for\n"),
    (["-f", "qcow2", "-o", ",", "IMG", "1M"], "Invalid option list: ,\n"),
    (["-f", "qcow2", "IMG", "1M", "extra"], "Unexpected argument: extra\n"),
])
def test_create_errors_exit_1_before_formatting(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               argv: list[str], err: str) -> None:
    qcow2(tmp_path / "base.qcow2", MiB)
    img = str(tmp_path / "new.qcow2")
    argv = [img if a == "IMG" else a for a in argv]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc, out, got = cli(capsys, "create", *argv)
    finally:
        os.chdir(cwd)
    assert (rc, out) == (1, "")
    first = got.splitlines(keepends=True)[0]
    assert first == "dirtybits create: " + err.replace("IMG", img).replace("DIR", str(tmp_path))
    assert not os.path.exists(img)


def test_create_driver_errors_come_after_formatting(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "x.qcow2"
    rc, out, err = cli(capsys, "create", "-f", "qcow2", "-o", "cluster_size=1000", img, "1M")
    assert rc == 1
    assert out.startswith(f"Formatting '{img}', fmt=qcow2 cluster_size=1000 ")
    assert err == (f"dirtybits create: {img}: Cluster size must be a power of two between 512 "
                   "and 2048k\n")
    assert not img.exists()


def test_create_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "create", "-f", "qcow2", "-o", "cluster_size=4x,help")
    assert rc == 0
    assert out.startswith("Supported qcow2 options:\n  backing_file=<str>     - ")


def test_create_raw_rounds_to_sector_and_writes_first_block(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "r.raw"
    rc, out, _ = cli(capsys, "create", img, "1025")
    assert (rc, out) == (0, f"Formatting '{img}', fmt=raw size=1025\n")
    assert img.stat().st_size == 1536
    fd = os.open(img, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0  # allocated, like file-posix's create
    finally:
        os.close(fd)


def test_create_raw_full_preallocation(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    img = tmp_path / "r.raw"
    rc, _, _ = cli(capsys, "create", "-q", "-o", "preallocation=full", img, "1M")
    assert rc == 0
    assert img.stat().st_blocks * 512 >= MiB
    rc, _, err = cli(capsys, "create", "-q", "-o", "preallocation=metadata", img, "1M")
    assert (rc, err) == (1, f"dirtybits create: {img}: Unsupported preallocation mode: "
                            "metadata\n")


# ---------------------------------------------------------------------------- map


def test_map_json_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = qcow2(tmp_path / "m.qcow2", 1 * MiB)
    write(img, ("w", 0, 128 * KiB, 1), ("w", 256 * KiB, 64 * KiB, 2),
          ("u", 256 * KiB, 64 * KiB, 0))
    got = map_json(capsys, img)
    assert [(e["start"], e["length"], e["present"], e["zero"], e["data"], "offset" in e)
            for e in got] == [
        (0, 128 * KiB, True, False, True, True),  # two host-contiguous clusters: one run
        (128 * KiB, 128 * KiB, False, True, False, False),
        (256 * KiB, 64 * KiB, True, True, False, False),
        (320 * KiB, 704 * KiB, False, True, False, False)]


def test_map_depth_past_short_backing_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # QEMU stops at the top image where the backing file ends; depth is 0 there, not 1
    qcow2(tmp_path / "base.qcow2", 1 * MiB)
    top = qcow2(tmp_path / "top.qcow2", 2 * MiB, backing_file="base.qcow2",
                backing_format="qcow2")
    got = map_json(capsys, top)
    assert [(e["start"], e["length"], e["depth"]) for e in got] == [
        (0, MiB, 1), (MiB, MiB, 0)]


def test_map_backing_data_keeps_depth_and_file(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = qcow2(tmp_path / "base.qcow2", 1 * MiB)
    write(base, ("w", 0, 64 * KiB, 7))
    top = qcow2(tmp_path / "top.qcow2", 1 * MiB, backing_file="base.qcow2",
                backing_format="qcow2")
    write(top, ("w", 64 * KiB, 64 * KiB, 8))
    rc, out, _ = cli(capsys, "map", top)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "Offset          Length          Mapped to       File"
    assert lines[1].split() == ["0", "0x10000", "0x50000", str(tmp_path / "base.qcow2")]
    assert lines[2].split()[:2] == ["0x10000", "0x10000"]
    assert lines[2].endswith(str(top))


def test_map_raw_tail_is_rounded_up_to_a_sector(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "odd.raw"
    img.write_bytes(b"a" * 1000)
    assert map_json(capsys, "-f", "raw", img) == [
        {"start": 0, "length": 1000, "depth": 0, "present": True, "zero": False, "data": True,
         "offset": 0},
        {"start": 1000, "length": 24, "depth": 0, "present": True, "zero": True, "data": False,
         "offset": 1000}]


def test_map_sparse_data_clusters_read_as_zero_past_holes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Data clusters with holes in the file (a punched tail); with more clusters in use than
    # on disk, QEMU checks the holes (BDRV_BLOCK_RECURSE) and so must we.
    from dirtybits.osfile import punch_hole

    img = qcow2(tmp_path / "s.qcow2", 16 * MiB)
    write(img, *[("w", i * MiB, 100, 1) for i in range(8)])
    with open_qcow2(str(img), readonly=True) as q:
        hosts = [e.offset for i in range(8) for e in q.block_status(i * MiB, 64 * KiB)]
    fd = os.open(img, os.O_RDWR)
    try:
        for host in hosts:
            assert host is not None
            punch_hole(fd, host + 4 * KiB, 60 * KiB)
    finally:
        os.close(fd)
    got = map_json(capsys, img)
    first, second = got[0], got[1]
    assert (first["start"], first["zero"], first["data"]) == (0, False, True)
    assert first["length"] < 64 * KiB
    assert (second["start"], second["zero"], second["data"], "offset" in second) == (
        first["length"], True, True, True)


def test_map_start_offset_and_max_length(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    img = qcow2(tmp_path / "m.qcow2", MiB)
    write(img, ("w", 0, 64 * KiB, 1))
    got = map_json(capsys, "--start-offset=1k", "--max-length", "1.5k", img)
    assert [(e["start"], e["length"], e.get("offset")) for e in got] == [(1024, 1536, 0x50400)]
    assert map_json(capsys, "-s", "2M", img) == [
        {"start": 2 * MiB, "length": 0, "depth": 0, "present": False, "zero": False,
         "data": False}]


def test_map_json_text_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = qcow2(tmp_path / "m.qcow2", 2 * MiB)
    write(img, ("w", MiB, 64 * KiB, 1))
    rc, out, _ = cli(capsys, "map", "--output", "json", img)
    assert rc == 0
    assert out == (
        '[{ "start": 0, "length": 1048576, "depth": 0, "present": false, "zero": true,'
        ' "data": false},\n'
        '{ "start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": false,'
        ' "data": true, "offset": 327680},\n'
        '{ "start": 1114112, "length": 983040, "depth": 0, "present": false, "zero": true,'
        ' "data": false}]\n')


@pytest.mark.parametrize(("argv", "err"), [
    (["--output=xml", "IMG"], "--output must be used with human or json as argument.\n"),
    (["--start-offset", "-5", "IMG"], "Invalid start offset specified. You may use k, M, G, T,"
     " P or E suffixes for\n"),
    (["IMG", "IMG"], "Expecting one image file name\n"),
    (["nope"], "Could not open 'nope': Could not open 'nope': No such file or directory\n"),
    (["-f", "vmdk", "IMG"], "Could not open 'IMG': Unknown driver 'vmdk'\n"),
])
def test_map_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                    err: str) -> None:
    img = str(qcow2(tmp_path / "m.qcow2", MiB))
    rc, _, got = cli(capsys, "map", *[img if a == "IMG" else a for a in argv])
    assert rc == 1
    assert got.splitlines(keepends=True)[0] == "dirtybits map: " + err.replace("IMG", img)


# ---------------------------------------------------------------------------- compare


def test_compare_identical_across_formats_and_chains(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = qcow2(tmp_path / "base.qcow2", 2 * MiB)
    write(base, ("w", 0, 64 * KiB, 1))
    top = qcow2(tmp_path / "top.qcow2", 2 * MiB, backing_file="base.qcow2",
                backing_format="qcow2")
    write(top, ("w", MiB, 4 * KiB, 2), ("z", 0, 0, 0))
    flat = tmp_path / "flat.raw"
    RawImage.create(str(flat), 2 * MiB)
    with RawImage(str(flat)) as r:
        r.write(0, b"\1" * 64 * KiB)
        r.write(MiB, b"\2" * 4 * KiB)
    assert cli(capsys, "compare", top, flat) == (0, "Images are identical.\n", "")


def test_compare_reports_first_differing_sector(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a = qcow2(tmp_path / "a.qcow2", 4 * MiB)
    b = qcow2(tmp_path / "b.qcow2", 4 * MiB)
    write(a, ("w", MiB, 64 * KiB, 1))
    write(b, ("w", MiB, 64 * KiB, 1), ("w", MiB + 1000, 1, 9), ("w", 3 * MiB, 1, 9))
    assert cli(capsys, "compare", a, b) == (1, f"Content mismatch at offset {MiB + 512}!\n", "")
    # one side unallocated: the other must read as zeros
    assert cli(capsys, "compare", "-q", b, a) == (1, "", "")
    write(a, ("w", MiB + 1000, 1, 9))
    assert cli(capsys, "compare", a, b)[1] == f"Content mismatch at offset {3 * MiB}!\n"


def test_compare_size_mismatch_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = qcow2(tmp_path / "s.qcow2", 1 * MiB)
    big = qcow2(tmp_path / "b.qcow2", 2 * MiB)
    write(big, ("z", MiB, 64 * KiB, 0))  # zero clusters are still zeros
    assert cli(capsys, "compare", small, big) == (
        0, "Warning: Image size mismatch!\nImages are identical.\n", "")
    assert cli(capsys, "compare", "-s", small, big) == (
        1, "Strict mode: Image size mismatch!\n", "")
    write(big, ("w", MiB + 5000, 1, 3))
    assert cli(capsys, "compare", big, small) == (
        1, f"Warning: Image size mismatch!\nContent mismatch at offset {MiB + 4608}!\n", "")


def test_compare_strict_block_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = qcow2(tmp_path / "a.qcow2", 4 * MiB)
    write(a, ("w", MiB, 64 * KiB, 1))
    b = qcow2(tmp_path / "b.qcow2", 4 * MiB)
    write(b, ("w", MiB, 64 * KiB, 1))
    assert cli(capsys, "compare", "-s", a, b)[0] == 0
    write(b, ("w", 2 * MiB, 64 * KiB, 1), ("u", 2 * MiB, 64 * KiB, 0))  # zero cluster
    assert cli(capsys, "compare", b, a)[0] == 0
    assert cli(capsys, "compare", "-s", a, b) == (
        1, f"Strict mode: Offset {MiB + 64 * KiB} block status mismatch!\n", "")


def test_compare_exit_codes_for_bad_input(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    a = qcow2(tmp_path / "a.qcow2", MiB)
    rc, out, err = cli(capsys, "compare", a, tmp_path / "nope")
    assert (rc, out) == (2, "")
    assert err == (f"dirtybits compare: Could not open '{tmp_path / 'nope'}': Could not open "
                   f"'{tmp_path / 'nope'}': No such file or directory\n")
    rc, _, err = cli(capsys, "compare", a)
    assert (rc, err.splitlines()[0]) == (1, "dirtybits compare: Expecting two image file names")


# ---------------------------------------------------------------------------- convert


def _allocated(path: Path) -> list[tuple[int, int]]:
    with open_qcow2(str(path), readonly=True) as img:
        return [(e.start, e.length) for e in img.block_status(0, img.size) if e.data]


def _contents(path: Path) -> bytes:
    from dirtybits.block.open import open_image

    with open_image(str(path), readonly=True) as img:
        return img.read(0, img.size)


def test_convert_flattens_chain_and_stays_sparse(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    base = qcow2(tmp_path / "base.qcow2", 4 * MiB)
    write(base, ("w", 0, 128 * KiB, 1), ("w", 2 * MiB, 64 * KiB, 0))  # data that is zeros
    top = qcow2(tmp_path / "top.qcow2", 4 * MiB, backing_file="base.qcow2",
                backing_format="qcow2")
    write(top, ("w", 64 * KiB, 4 * KiB, 2), ("z", 0, 64 * KiB, 0), ("w", 3 * MiB, 1, 3))
    raw = tmp_path / "flat.raw"
    assert cli(capsys, "convert", "-O", "raw", top, raw) == (0, "", "")
    assert raw.stat().st_size == 4 * MiB
    assert _contents(raw) == _contents(top)
    assert raw.stat().st_blocks * 512 < MiB  # holes, not written zeros
    back = tmp_path / "back.qcow2"
    assert cli(capsys, "convert", "-O", "qcow2", "-o", "cluster_size=64k", raw, back)[0] == 0
    assert _contents(back) == _contents(top)
    # only clusters with non-zero bytes are allocated, and the target has no backing file
    assert _allocated(back) == [(64 * KiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    with open_qcow2(str(back), readonly=True) as q:
        assert q.hc.backing_file is None


def test_convert_into_existing_target_zeroes_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = qcow2(tmp_path / "src.qcow2", 2 * MiB)
    write(src, ("w", 0, 4 * KiB, 5))
    dst = qcow2(tmp_path / "dst.qcow2", 2 * MiB)
    write(dst, ("w", 0, 2 * MiB, 0xEE))
    assert cli(capsys, "convert", "-n", "-O", "qcow2", src, dst)[0] == 0
    assert _contents(dst) == _contents(src)


def test_convert_sparse_zero_writes_everything(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = qcow2(tmp_path / "src.qcow2", MiB)
    dst = tmp_path / "dst.qcow2"
    assert cli(capsys, "convert", "-S", "0", "-O", "qcow2", src, dst)[0] == 0
    assert _allocated(dst) == [(0, MiB)]


@pytest.mark.parametrize(("argv", "err"), [
    (["-c", "-O", "raw", "SRC", "DST"], "Compression not supported for this file format"),
    (["-O", "qcow2", "-o", "foo=1", "SRC", "DST"], "Invalid parameter 'foo'"),
    (["-O", "qcow2", "-o", "cluster_size=1000", "SRC", "DST"],
     "DST: error while converting qcow2: Cluster size must be a power of two between 512 and "
     "2048k"),
    (["-n", "-O", "qcow2", "-o", "cluster_size=4k", "SRC", "DST"],
     "-o has no effect when skipping image creation"),
    (["-S", "1000", "SRC", "DST"], "Invalid buffer size for sparse output specified. Valid "
     "sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully "
     "allocates output)."),
    (["SRC"], "Must specify image file name"),
    (["-O", "vmdk", "SRC", "DST"], "Unknown file format 'vmdk'"),
])
def test_convert_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                        err: str) -> None:
    src = str(qcow2(tmp_path / "src.qcow2", MiB))
    dst = str(tmp_path / "dst.qcow2")
    rc, out, got = cli(capsys, "convert",
                       *[{"SRC": src, "DST": dst}.get(a, a) for a in argv])
    assert (rc, out) == (1, "")
    assert got == f"dirtybits convert: {err.replace('DST', dst)}\n"
    assert not os.path.exists(dst)


def test_convert_refuses_smaller_existing_target(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = qcow2(tmp_path / "src.qcow2", 2 * MiB)
    dst = qcow2(tmp_path / "dst.qcow2", 1 * MiB)
    assert cli(capsys, "convert", "-n", "-O", "qcow2", src, dst) == (
        1, "", "dirtybits convert: output file is smaller than input file\n")


def test_metadata_image_for_a_raw_drive_takes_the_drive_size(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    drive = tmp_path / "drive.raw"
    drive.write_bytes(b"")
    os.truncate(drive, 5 * MiB + 100)  # rounded up to whole sectors, as the image size is
    rc, _out, err = cli(capsys, "create", "-f", "qcow2", "-o",
                        f"data_file={drive},data_file_raw=on", tmp_path / "meta.qcow2")
    assert rc == 0, err
    with open_qcow2(str(tmp_path / "meta.qcow2"), readonly=True) as img:
        assert img.size == 5 * MiB + 512
    rc, _out, err = cli(capsys, "create", "-f", "qcow2", "-o", f"data_file={drive}",
                        tmp_path / "m2.qcow2")
    assert rc == 1 and "needs a size" in err  # without data_file_raw the file is not the disk
