"""``create``, ``map``, ``compare`` and ``convert`` side by side with qemu-img 7.2.

Same arguments to both tools: exit codes, stdout and stderr must match (stderr with
``dirtybits CMD:`` read as ``qemu-img:``). Images come from qemu-img/qemu-io and from
dirtybits itself; converted images must be ``qemu-img compare``-identical to their source and
``qemu-img check``-clean.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import peers
from peers import db, run, sh

pytestmark = pytest.mark.interop

Cli = Callable[..., "subprocess.CompletedProcess[str]"]
Proc = "subprocess.CompletedProcess[str]"


def ok(*cmd: str | Path, cwd: Path | None = None) -> str:
    return sh(*cmd, cwd=cwd).stdout


def qemu_io(path: Path, *cmds: str) -> None:
    # from the image's directory: QEMU 7.2 opens a relative data_file name from the cwd
    peers.qemu_io(path.name, *cmds, cwd=path.parent)


def dirtybits(*args: str | Path, cwd: Path) -> str:
    return db(*args, cwd=cwd).stdout


def qcreate(path: Path, size: str = "4M", opts: str = "", *extra: str) -> Path:
    ok("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), *extra,
       path.name, size, cwd=path.parent)
    return path


def as_qemu(text: str, command: str) -> str:
    """dirtybits' stderr in qemu-img's words: program name, help hint."""
    return (text.replace(f"dirtybits {command}: ", "qemu-img: ")
            .replace(f"dirtybits {command} --help", "qemu-img --help"))


def assert_same(theirs: subprocess.CompletedProcess[str],
                ours: subprocess.CompletedProcess[str], command: str) -> None:
    assert (ours.returncode, ours.stdout, as_qemu(ours.stderr, command)) == (
        theirs.returncode, theirs.stdout, theirs.stderr)


# ---------------------------------------------------------------------------- create

CREATE_SAME = [
    "-f qcow2 new.qcow2 1G",
    "-f qcow2 -b base.qcow2 -F qcow2 new.qcow2",
    "-f qcow2 -b base.qcow2 -F qcow2 -o cluster_size=4k new.qcow2 2G",
    "-f qcow2 -b odd.raw -F raw new.qcow2",
    "-f qcow2 -b base.qcow2 -F raw new.qcow2",
    "-f qcow2 -o backing_file=base.qcow2 -F qcow2 new.qcow2",
    "-f qcow2 -o backing_file=odd.raw,backing_fmt=qcow2 -b base.qcow2 new.qcow2",
    "-f qcow2 -u -b nonexist.qcow2 -F qcow2 new.qcow2 1M",
    "-f qcow2 -u -o backing_file=a,,b.qcow2 -F qcow2 new.qcow2 1M",
    "-f qcow2 -o data_file=new.data,data_file_raw=on new.qcow2 10M",
    "-f qcow2 -o data_file=new.data new.qcow2 10M",
    "-f qcow2 -o compat=0.10 new.qcow2 1M",
    "-f qcow2 -o compression_type=zstd new.qcow2 1G",
    "-f qcow2 -o compression_type=zstd,cluster_size=4k new.qcow2 1M",
    "-f qcow2 -o compression_type=zlib new.qcow2 1M",
    "-f qcow2 -o compat=v3,encryption=off new.qcow2 1M",
    "-f qcow2 -o cluster_size=512 -o lazy_refcounts=on new.qcow2 1M",
    "-f qcow2 -o cluster_size=2M,refcount_bits=1 new.qcow2 3G",
    "-f qcow2 -o refcount_bits=64,nolazy_refcounts new.qcow2 1M",
    "-f qcow2 -o lazy_refcounts=yes,preallocation=off new.qcow2 1M",
    "-f qcow2 -o size=1.5k new.qcow2",
    "-f qcow2 -o extended_l2=on new.qcow2 1G",
    "-f qcow2 -o extended_l2=on,cluster_size=16k new.qcow2 3G",
    "-f qcow2 -o extended_l2=on,cluster_size=2M new.qcow2 5G",
    "-f qcow2 -b base.qcow2 -F qcow2 -o extended_l2=on,cluster_size=32k new.qcow2",
    "-f qcow2 -o extended_l2=on,data_file=new.data,data_file_raw=on new.qcow2 10M",
    "-f qcow2 -o extended_l2=on,preallocation=off new.qcow2 1025",
    "-f qcow2 new.qcow2 1025",
    "-f qcow2 new.qcow2 0",
    "-f qcow2 new.qcow2 0x1000",
    "-f qcow2 -o cluster_size=512 new.qcow2 128G",
    # huge L1 tables in small clusters: many refcount blocks and refcount table growth, laid
    # out by QEMU's allocator (refblocks after the run, -EAGAIN retries, the table regrown
    # half again as large past the last group, the old table freed into a hole)
    "-f qcow2 -o cluster_size=512 new.qcow2 16G",
    "-f qcow2 -o cluster_size=512 new.qcow2 64G",
    "-f qcow2 -o cluster_size=512,refcount_bits=1 new.qcow2 128G",
    "-f qcow2 -o cluster_size=512,refcount_bits=64 new.qcow2 128G",
    "-f qcow2 -o cluster_size=1k,refcount_bits=2 new.qcow2 256G",
    "-f qcow2 -o cluster_size=4k new.qcow2 8T",
    "-f qcow2 -o refcount_bits=64 new.qcow2 64T",
    "-f qcow2 -o refcount_bits=1 new.qcow2 1T",
    "-f qcow2 -o cluster_size=512 new.qcow2 1T",  # too large for 512-byte clusters
    "-f qcow2 -o cluster_size=4k new.qcow2 16T",  # as qemu-img: refused
    "new.raw 1M",
    "-f raw new.raw 1025",
    "-f raw -o preallocation=falloc new.raw 100k",
    "-f raw -o preallocation=full,nocow=off new.raw 100k",
    "-q -f qcow2 new.qcow2 1M",
    # errors: text, stream and exit code as qemu-img's
    "-f qcow2 -o foo=bar new.qcow2 1M",
    "-f qcow2 new.qcow2",
    "-f qcow2 -b base.qcow2 new.qcow2",
    "-f qcow2 -b nonexist.qcow2 -F qcow2 new.qcow2",
    "-f qcow2 -b base.qcow2 -F foo new.qcow2",
    "-f raw -b base.qcow2 -F qcow2 new.raw",
    "-f raw -o cluster_size=4k new.raw 1M",
    "-f qcow2 -o size=2M new.qcow2 1M",
    "-f qcow2 new.qcow2 1M extra",
    "-f qcow2",
    "-f foo new.qcow2 1M",
    "-f qcow2 new.qcow2 1x",
    "-f qcow2 new.qcow2 99E",
    "-f qcow2 new.qcow2 7E",
    "-f qcow2 -o cluster_size=512 new.qcow2 129G",
    "-f qcow2 new.qcow2 1E",  # QEMU's L1 limit, checked before any file is made
    "-f qcow2 new.qcow2 2251799813686272",  # a sector past it (2 PiB is the largest)
    "-f qcow2 -o , new.qcow2 1M",
    "-f qcow2 -o cluster_size=4k, new.qcow2 1M",
    "-f qcow2 -o cluster_size=1000 new.qcow2 1M",
    "-f qcow2 -o cluster_size=4x new.qcow2 1M",
    "-f qcow2 -o cluster_size new.qcow2 1M",
    "-f qcow2 -o size=20E new.qcow2",
    "-f qcow2 -o refcount_bits=3 new.qcow2 1M",
    "-f qcow2 -o refcount_bits=x new.qcow2 1M",
    "-f qcow2 -o refcount_bits=-1 new.qcow2 1M",
    "-f qcow2 -o compat=2 new.qcow2 1M",
    "-f qcow2 -o compat=foo,compression_type=x,preallocation=y new.qcow2 1M",
    "-f qcow2 -o preallocation=y,compression_type=x new.qcow2 1M",
    "-f qcow2 -o lazy_refcounts=maybe new.qcow2 1M",
    "-f qcow2 -o lazy_refcounts=true,compat=0.10 new.qcow2 1M",
    "-f qcow2 -o refcount_bits=8,compat=0.10 new.qcow2 1M",
    "-f qcow2 -o data_file_raw=on new.qcow2 1M",
    "-f qcow2 -o compat=v2,data_file=new.data new.qcow2 1M",
    "-f qcow2 -o backing_fmt=qcow2 new.qcow2 1M",
    "-f qcow2 -b base.qcow2 -F qcow2 -o data_file=new.data,data_file_raw=on new.qcow2",
    "-f qcow2 -b base.qcow2 -F qcow2 -o preallocation=metadata new.qcow2",
    "-f qcow2 -o compat=0.10,compression_type=zstd new.qcow2 1M",
    "-f qcow2 -o extended_l2=on,cluster_size=1k new.qcow2 1M",
    "-f qcow2 -o extended_l2=on,compat=0.10 new.qcow2 1M",
    "-f raw -o preallocation=metadata new.raw 1M",
    "-f raw -o preallocation=foo new.raw 1M",
    "-f qcow2 -b new.qcow2 -F qcow2 new.qcow2",
    "-f qcow2 -o help",
    "-f raw -o help",
    "-f qcow2 -o cluster_size=4x,help new.qcow2",
    "-f raw -o ? new.raw",
]


def _create_dir(w: Path, name: str) -> Path:
    d = w / name
    d.mkdir()
    qcreate(d / "base.qcow2", "1G")
    (d / "odd.raw").write_bytes(b"a" * 1000)
    return d


def test_create_small_clusters_huge_disk_is_clean(workdir: Path, qemu_tools: dict[str, str],
                                                  dirtybits_cli: Cli) -> None:
    """The allocation bound once counted the old size during the resize inside create: a 128G
    disk in 512-byte clusters failed with 'no free cluster' and was marked corrupt."""
    ours = dirtybits_cli("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "new.qcow2",
                         "128G", cwd=workdir)
    assert ours.returncode == 0, ours.stderr
    ok("qemu-img", "check", "new.qcow2", cwd=workdir)
    info = json.loads(ok("qemu-img", "info", "--output=json", "new.qcow2", cwd=workdir))
    assert info["virtual-size"] == 128 << 30


@pytest.mark.parametrize("args", CREATE_SAME)
def test_create_matches_qemu_img(args: str, workdir: Path, qemu_tools: dict[str, str],
                                 dirtybits_cli: Cli) -> None:
    qd, dd = _create_dir(workdir, "q"), _create_dir(workdir, "d")
    argv = args.split()
    theirs = run("qemu-img", "create", *argv, cwd=qd)
    ours = dirtybits_cli("create", *argv, cwd=dd)
    # qemu-img ends the "Detected format of qcow2." hint without a newline; we add one
    theirs.stderr = theirs.stderr.rstrip("\n") + "\n" if theirs.stderr else ""
    assert_same(theirs, ours, "create")
    made_here = sorted(p.name for p in dd.iterdir() if p.name.startswith("new."))
    if ours.returncode:
        assert made_here == []  # checked before anything is created (qemu-img may leave a file)
        return
    assert made_here == sorted(p.name for p in qd.iterdir() if p.name.startswith("new."))
    for made in made_here:
        if made.endswith(".qcow2"):
            info = ["qemu-img", "info", "--output=json", "-U", made]
            q_info, d_info = json.loads(ok(*info, cwd=qd)), json.loads(ok(*info, cwd=dd))
            q_info.pop("actual-size"), d_info.pop("actual-size")
            assert d_info == q_info
            if "-u" not in argv:  # with -u the backing file need not exist
                ok("qemu-img", "check", made, cwd=dd)
        # the very same bytes: a script cannot tell which tool made the image (compared by
        # digest: pytest's diff of two large byte strings would run for many minutes)
        ours_b, theirs_b = (dd / made).read_bytes(), (qd / made).read_bytes()
        assert (len(ours_b), hashlib.sha256(ours_b).hexdigest()) == \
            (len(theirs_b), hashlib.sha256(theirs_b).hexdigest()), made
        if made.endswith(".raw"):  # and for raw, the same holes
            assert (ok("qemu-img", "map", "--output=json", "-f", "raw", made, cwd=dd)
                    == ok("qemu-img", "map", "--output=json", "-f", "raw", made, cwd=qd)), made


@pytest.mark.parametrize(("opts", "message"), [
    ("preallocation=metadata", "preallocation=metadata is not supported for qcow2 (only off)"),
    ("encrypt.format=luks,encrypt.key-secret=s", "encrypted qcow2 images are not supported"),
    ("nocow=on", "nocow=on is not supported"),
])
def test_create_refuses_what_it_cannot_write(opts: str, message: str, workdir: Path,
                                             qemu_tools: dict[str, str],
                                             dirtybits_cli: Cli) -> None:
    ours = dirtybits_cli("create", "-f", "qcow2", "-o", opts, "new.qcow2", "1M")
    theirs_line = run("qemu-img", "create", "-f", "qcow2", "-o", opts, "q.qcow2", "1M",
                      cwd=workdir).stdout
    assert ours.returncode == 1
    # the same Formatting line first, then a clear refusal instead of a different image
    assert ours.stdout == theirs_line.replace("q.qcow2", "new.qcow2")
    assert ours.stderr == f"dirtybits create: new.qcow2: {message}\n"
    assert not (workdir / "new.qcow2").exists()


# ---------------------------------------------------------------------------- map


def img_plain(w: Path) -> str:
    p = qcreate(w / "m.qcow2")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 128k 64k", "write -P 3 192k 64k",
            "write -z 512k 128k", "write -P 4 1M 64k", "discard 1M 64k", "write -P 5 2M 100",
            "write -z -u 3M 64k", "write -P 6 3584k 64k", "write -z 3584k 64k")
    return p.name


def img_chain(w: Path) -> str:
    base = qcreate(w / "base.qcow2", "1M")
    qemu_io(base, "write -P 1 0 192k", "write -z 256k 64k", "write -P 2 768k 64k")
    mid = qcreate(w / "mid.qcow2", "2M", "", "-b", "base.qcow2", "-F", "qcow2")
    qemu_io(mid, "write -P 3 64k 64k", "write -z 128k 64k", "discard 768k 64k",
            "write -P 4 1536k 64k")
    top = qcreate(w / "top.qcow2", "4M", "", "-b", "mid.qcow2", "-F", "qcow2")
    qemu_io(top, "write -P 5 0 4k", "write -P 6 3M 64k", "write -z 3M 64k")
    return top.name


def img_raw_backing(w: Path) -> str:
    with open(w / "b.raw", "wb") as f:
        f.truncate(1 << 20)
        f.seek(8192)
        f.write(b"x" * 5000)
        f.seek(512 * 1024)
        f.write(b"y" * 70000)
    top = qcreate(w / "o.qcow2", "2M", "", "-b", "b.raw", "-F", "raw")
    qemu_io(top, "write -P 1 64k 64k")
    return top.name


def img_compressed(w: Path) -> str:
    src = qcreate(w / "src.qcow2", "2M")
    qemu_io(src, "write -P 1 0 192k", "write -P 0 256k 64k", "write -P 7 1M 100k")
    ok("qemu-img", "convert", "-c", "-O", "qcow2", "src.qcow2", "c.qcow2", cwd=w)
    qemu_io(w / "c.qcow2", "write -P 9 64k 64k")
    return "c.qcow2"


def img_data_file(w: Path) -> str:
    p = qcreate(w / "df.qcow2", "4M", "data_file=df.data")
    qemu_io(p, "write -P 1 64k 64k", "write -z 256k 64k", "write -P 2 1M 64k", "write -z 1M 64k")
    return p.name


def img_data_file_raw(w: Path) -> str:
    p = qcreate(w / "dfr.qcow2", "4M", "data_file=dfr.data,data_file_raw=on")
    qemu_io(p, "write -P 1 64k 64k", "write -z 256k 64k", "discard 1M 64k")
    return p.name


def img_prealloc_metadata(w: Path) -> str:
    p = qcreate(w / "pm.qcow2", "1M", "preallocation=metadata")
    qemu_io(p, "write -P 1 64k 4k")
    return p.name


def _clusters(size: str) -> Callable[[Path], str]:
    def make(w: Path) -> str:
        p = qcreate(w / f"c{size}.qcow2", "8M", f"cluster_size={size}")
        qemu_io(p, "write -P 1 0 3000", "write -P 2 1M 1M", "write -z 4M 2M",
                "write -P 3 6M 512")
        return p.name
    return make


def img_v2(w: Path) -> str:
    p = qcreate(w / "v2.qcow2", "1M", "compat=0.10")
    qemu_io(p, "write -P 1 0 128k", "write -z 0 64k", "discard 64k 64k", "write -z 512k 64k")
    return p.name


def img_raw_odd(w: Path) -> str:
    with open(w / "odd.raw", "wb") as f:
        f.truncate(10000)
        f.seek(9000)
        f.write(b"a" * 1000)
    return "odd.raw"


def img_empty(w: Path) -> str:
    return qcreate(w / "empty.qcow2", "0").name


def img_written_by_dirtybits(w: Path) -> str:
    """Partial writes into fresh clusters leave holes: qemu-img map then looks inside."""
    p = qcreate(w / "d.qcow2", "64M")
    dirtybits("io", "-c", "write -P 1 0 100", "-c", "write -P 2 1M 100", "-c", "write -P 3 2M 4k",
              "-c", "write -P 4 3M 64k", "-c", "write -P 5 8M 1k", "-c", "write -P 5 9M 1k",
              "-c", "write -z 9M 64k", "-c", "write -P 5 11M 1k", "-c", "discard 3M 64k",
              p.name, cwd=w)
    return p.name


def img_created_by_dirtybits(w: Path) -> str:
    dirtybits("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "dc.qcow2", "8M", cwd=w)
    dirtybits("io", "-c", "write -P 1 0 1M", "-c", "write -P 2 5M 12k", "-c", "write -z 512k 8k",
              "dc.qcow2", cwd=w)
    return "dc.qcow2"


MAP_IMAGES: dict[str, Callable[[Path], str]] = {
    "plain": img_plain,
    "chain-with-short-backing": img_chain,
    "raw-backing": img_raw_backing,
    "compressed": img_compressed,
    "data-file": img_data_file,
    "data-file-raw": img_data_file_raw,
    "preallocation-metadata": img_prealloc_metadata,
    "cluster_size=512": _clusters("512"),
    "cluster_size=2M": _clusters("2M"),
    "compat=0.10": img_v2,
    "raw-odd-size": img_raw_odd,
    "empty": img_empty,
    "written-by-dirtybits": img_written_by_dirtybits,
    "created-by-dirtybits": img_created_by_dirtybits,
}
# Guest cluster 0 of an external data file maps to host offset 0; its L2 entry is 0|COPIED,
# which the engine reads as unallocated (QEMU: allocated, see qcow2_get_cluster_type).
MAP_XFAIL: dict[str, str] = {}  # engine bugs pinned here once fixed are removed


@pytest.mark.parametrize("kind", list(MAP_IMAGES))
def test_map_matches_qemu_img(kind: str, workdir: Path, qemu_tools: dict[str, str],
                              dirtybits_cli: Cli, request: pytest.FixtureRequest) -> None:
    if kind in MAP_XFAIL:
        request.applymarker(pytest.mark.xfail(reason=MAP_XFAIL[kind], strict=True))
    name = MAP_IMAGES[kind](workdir)
    for extra in ([], ["--start-offset=100", "--max-length=1.5M"], ["-s", "2M", "-l", "0"]):
        for output in ("json", "human"):
            args = [f"--output={output}", *extra, name]
            theirs = run("qemu-img", "map", *args, cwd=workdir)
            assert_same(theirs, dirtybits_cli("map", *args), "map")


@pytest.mark.parametrize("args", [
    ["--output=xml", "m.qcow2"], ["--start-offset", "1x", "m.qcow2"],
    ["--max-length", "-1", "m.qcow2"], ["-f", "raw", "--output", "json", "m.qcow2"],
    ["nonexist"], ["-f", "foo", "m.qcow2"], [], ["m.qcow2", "m.qcow2"],
])
def test_map_options_and_errors(args: list[str], workdir: Path, qemu_tools: dict[str, str],
                                dirtybits_cli: Cli) -> None:
    img_plain(workdir)
    theirs = run("qemu-img", "map", *args, cwd=workdir)
    ours = dirtybits_cli("map", *args)
    if theirs.returncode and "Try" in theirs.stderr:  # getopt usage: same first line only
        assert ours.returncode == 1
        assert as_qemu(ours.stderr, "map").splitlines()[0] == theirs.stderr.splitlines()[0]
        return
    assert_same(theirs, ours, "map")


# ---------------------------------------------------------------------------- compare


@pytest.fixture
def compare_images(workdir: Path, qemu_tools: dict[str, str]) -> Path:
    w = workdir
    for name, size in (("a", "4M"), ("b", "4M"), ("big", "8M"), ("bigdiff", "8M"),
                       ("z", "4M"), ("sector", "4M")):
        qcreate(w / f"{name}.qcow2", size)
    qemu_io(w / "a.qcow2", "write -P 1 1M 64k")
    qemu_io(w / "big.qcow2", "write -P 1 1M 64k", "write -z 6M 64k")
    qemu_io(w / "bigdiff.qcow2", "write -P 1 1M 64k", "write -P 2 6M 512")
    qemu_io(w / "z.qcow2", "write -P 0 0 1M")
    qemu_io(w / "sector.qcow2", "write -P 1 1M 64k", "write -P 3 1050000 1")
    shutil.copy(w / "a.qcow2", w / "copy.qcow2")
    ok("qemu-img", "convert", "-O", "raw", "a.qcow2", "a.raw", cwd=w)
    ok("qemu-img", "convert", "-c", "-O", "qcow2", "a.qcow2", "ac.qcow2", cwd=w)
    qcreate(w / "t.qcow2", "4M", "", "-b", "a.qcow2", "-F", "qcow2")
    qemu_io(w / "t.qcow2", "write -P 1 1M 64k", "write -z 2M 64k")
    (w / "odd.raw").write_bytes(b"a" * 1000)
    ok("qemu-img", "convert", "-O", "qcow2", "odd.raw", "odd.qcow2", cwd=w)
    return w


COMPARE_PAIRS = [
    "a.qcow2 copy.qcow2", "a.qcow2 b.qcow2", "b.qcow2 a.qcow2", "a.qcow2 sector.qcow2",
    "a.qcow2 big.qcow2", "big.qcow2 a.qcow2", "a.qcow2 bigdiff.qcow2", "bigdiff.qcow2 a.qcow2",
    "a.qcow2 a.raw", "a.qcow2 ac.qcow2", "a.qcow2 t.qcow2", "z.qcow2 b.qcow2",
    "odd.raw odd.qcow2", "-f raw a.qcow2 a.qcow2", "-F raw a.raw a.raw", "a.qcow2 nonexist",
    "nonexist a.qcow2", "-f foo a.qcow2 a.qcow2",
]


@pytest.mark.parametrize("pair", COMPARE_PAIRS)
@pytest.mark.parametrize("mode", [[], ["-s"], ["-q"], ["-s", "-q"]], ids=["", "-s", "-q", "-sq"])
def test_compare_matches_qemu_img(pair: str, mode: list[str], compare_images: Path,
                                  dirtybits_cli: Cli) -> None:
    args = [*mode, *pair.split()]
    theirs = run("qemu-img", "compare", *args, cwd=compare_images)
    assert_same(theirs, dirtybits_cli("compare", *args), "compare")


def test_compare_usage_errors_exit_1(compare_images: Path, dirtybits_cli: Cli) -> None:
    for args in (["a.qcow2"], ["-x", "a.qcow2", "a.qcow2"]):
        theirs = run("qemu-img", "compare", *args, cwd=compare_images)
        ours = dirtybits_cli("compare", *args)
        assert ours.returncode == theirs.returncode == 1
        assert as_qemu(ours.stderr, "compare").splitlines() == theirs.stderr.splitlines()


# ---------------------------------------------------------------------------- convert


def chain_source(w: Path) -> str:
    base = qcreate(w / "base.qcow2", "8M")
    qemu_io(base, "write -P 1 0 192k", "write -z 256k 64k", "write -P 5 1M 1k",
            "write -P 0 2M 64k", "write -P 7 7M 1M")
    top = qcreate(w / "top.qcow2", "16M", "", "-b", "base.qcow2", "-F", "qcow2")
    qemu_io(top, "write -P 2 64k 64k", "write -z 128k 64k", "discard 320k 64k",
            "write -P 3 9M 64k", "write -P 4 12M 3k", "write -z 7M 64k")
    return top.name


@pytest.mark.parametrize("opts", ["", "cluster_size=512", "cluster_size=2M", "compat=0.10",
                                  "refcount_bits=1,lazy_refcounts=on",
                                  "data_file=out.data,data_file_raw=on"])
def test_convert_round_trip_flattens_chain(opts: str, workdir: Path, qemu_tools: dict[str, str],
                                           dirtybits_cli: Cli) -> None:
    src = chain_source(workdir)
    o = ["-o", opts] if opts else []
    assert dirtybits_cli("convert", "-O", "raw", src, "flat.raw").returncode == 0
    ours = dirtybits_cli("convert", "-O", "qcow2", *o, "flat.raw", "out.qcow2")
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, "", "")
    for target in ("flat.raw", "out.qcow2"):
        assert run("qemu-img", "compare", src, target, cwd=workdir).returncode == 0, target
    assert run("qemu-img", "check", "out.qcow2", cwd=workdir).returncode == 0
    info = json.loads(ok("qemu-img", "info", "--output=json", "out.qcow2", cwd=workdir))
    assert "backing-filename" not in info
    # the same guest clusters allocated as in qemu-img convert's own output
    ok("qemu-img", "convert", "-O", "qcow2", *o, src, "ref.qcow2", cwd=workdir)
    if "data_file" in opts:
        (workdir / "out.data").rename(workdir / "ours.data")
        ok("qemu-img", "convert", "-O", "qcow2", *o, src, "ref.qcow2", cwd=workdir)
    assert guest_data("out.qcow2", workdir) == guest_data("ref.qcow2", workdir)


def guest_data(name: str, cwd: Path) -> list[tuple[int, int]]:
    """[start, end) of the guest ranges qemu-img map calls data, host offsets aside (and its
    zero flag: QEMU sets that inside data clusters from the file's holes, by a heuristic)."""
    runs: list[tuple[int, int]] = []
    for e in json.loads(ok("qemu-img", "map", "--output=json", name, cwd=cwd)):
        if not e["data"]:
            continue
        if runs and runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], e["start"] + e["length"])
        else:
            runs.append((e["start"], e["start"] + e["length"]))
    return runs


def test_convert_to_raw_has_qemu_img_layout(workdir: Path, qemu_tools: dict[str, str],
                                            dirtybits_cli: Cli) -> None:
    src = chain_source(workdir)
    assert dirtybits_cli("convert", "-O", "raw", src, "ours.raw").returncode == 0
    ok("qemu-img", "convert", "-O", "raw", src, "theirs.raw", cwd=workdir)
    assert (workdir / "ours.raw").read_bytes() == (workdir / "theirs.raw").read_bytes()
    maps = [ok("qemu-img", "map", "-f", "raw", "--output=json", n, cwd=workdir)
            for n in ("ours.raw", "theirs.raw")]
    assert maps[0].replace("ours", "theirs") == maps[1]


def test_convert_compressed_source_and_progress(workdir: Path, qemu_tools: dict[str, str],
                                                dirtybits_cli: Cli) -> None:
    src = img_compressed(workdir)
    ours = dirtybits_cli("convert", "-p", "-O", "qcow2", src, "out.qcow2")
    assert (ours.returncode, ours.stdout) == (0, "")
    assert "100%" in ours.stderr  # the progress bar went to stderr
    assert run("qemu-img", "compare", "-s", "out.qcow2", "out.qcow2", cwd=workdir).returncode == 0
    assert run("qemu-img", "compare", src, "out.qcow2", cwd=workdir).returncode == 0
    assert run("qemu-img", "check", "out.qcow2", cwd=workdir).returncode == 0


def test_convert_into_existing_image(workdir: Path, qemu_tools: dict[str, str],
                                     dirtybits_cli: Cli) -> None:
    src = chain_source(workdir)
    qcreate(workdir / "dst.qcow2", "32M")
    qemu_io(workdir / "dst.qcow2", "write -P 0xee 0 16M")
    assert dirtybits_cli("convert", "-n", "-O", "qcow2", src, "dst.qcow2").returncode == 0
    # the first 16M now read as the source, the rest was left alone
    cmp = run("qemu-img", "compare", src, "dst.qcow2", cwd=workdir)
    assert (cmp.returncode, cmp.stdout) == (0, "Warning: Image size mismatch!\n"
                                               "Images are identical.\n")
    assert run("qemu-img", "check", "dst.qcow2", cwd=workdir).returncode == 0


@pytest.mark.parametrize("args", [
    "-O qcow2 nonexist x.qcow2", "-O qcow2 -o foo=bar SRC x.qcow2", "-c -O raw SRC x.raw",
    "-n -O qcow2 SRC nonexist.qcow2", "-O foo SRC x.qcow2", "SRC",
    "-O qcow2 -o cluster_size=1000 SRC x.qcow2", "-O qcow2 -o refcount_bits=3 SRC x.qcow2",
    "-S 1x -O raw SRC x.raw", "-S 1000 -O raw SRC x.raw", "-S 32M -O raw SRC x.raw",
    "-O qcow2 -o backing_file=SRC SRC x.qcow2", "-n -O qcow2 -o cluster_size=4k SRC x.qcow2",
    "-n -O qcow2 SRC small.qcow2", "-O qcow2 -o , SRC x.qcow2", "-O qcow2 -o help SRC x.qcow2",
    "-O raw -o help", "-f foo -O qcow2 SRC x.qcow2",
])
def test_convert_messages_match_qemu_img(args: str, workdir: Path, qemu_tools: dict[str, str],
                                         dirtybits_cli: Cli) -> None:
    qcreate(workdir / "s.qcow2", "4M")
    qcreate(workdir / "small.qcow2", "1M")
    argv = [a.replace("SRC", "s.qcow2") for a in args.split()]
    theirs = run("qemu-img", "convert", *argv, cwd=workdir)
    for leftover in ("x.qcow2", "x.raw"):
        (workdir / leftover).unlink(missing_ok=True)
    assert_same(theirs, dirtybits_cli("convert", *argv), "convert")
