"""``dirtybits nbd`` against ``qemu-nbd`` (QEMU 7.2): the same client, run against each server
serving its own copy of the same image, sees the same thing.

Every test takes a ``kind``: the server under test, compared with a qemu-nbd reference. The
``qemu-nbd`` case (qemu-nbd against itself) proves the plumbing and the normalisation, and
holds the oracles on the reference (known dirty extents, sizes, patterns); the ``dirtybits``
case is the real test, skipped while this checkout has no ``dirtybits nbd``. Outputs differ
only where they must: socket paths and ports (``Served.scrub``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

import peers
from peers import nbd, qemu_bitmaps, qemu_img, qemu_io
from peers.nbd import Served

pytestmark = pytest.mark.interop

T = TypeVar("T")
MiB = 1 << 20
SIZE = 4 * MiB
ODD_SIZE = MiB + 1007  # a raw file 512-byte unaligned: qemu-nbd exports it as 1049600 bytes
# b0's dirty extents in the source image (64 KiB granularity): what the writes after its
# creation touched (build_source).
B0_DIRTY = [(64 << 10, 128 << 10), (1 * MiB, 128 << 10), (3 * MiB, 64 << 10),
            (3584 << 10, 128 << 10)]
B1_DIRTY = [(3 * MiB, 4 << 10), (3584 << 10, 100 << 10)]  # 4 KiB granularity, disabled
TRANSPORT = pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])


# ---------------------------------------------------------------------------- images
def build_source(d: Path) -> None:
    """``top.qcow2`` over ``base.qcow2`` (4 MiB, 64 KiB clusters): data in both, zero clusters,
    unallocated areas; bitmap ``b0`` (64 KiB, recording) and ``b1`` (4 KiB, disabled) with
    the dirty extents B0_DIRTY and B1_DIRTY; ``odd.raw``, a raw file of ODD_SIZE bytes."""
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", str(SIZE))
    qemu_io(d / "base.qcow2", "write -P 0x11 0 512k", "write -P 0x22 2M 256k", fmt="qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             d / "top.qcow2", cwd=d)
    qemu_img("bitmap", "--add", d / "top.qcow2", "b0")
    qemu_io(d / "top.qcow2", "write -P 0x5a 64k 128k", "write -z 1M 128k", fmt="qcow2")
    qemu_img("bitmap", "--add", "-g", "4k", d / "top.qcow2", "b1")
    qemu_io(d / "top.qcow2", "write -P 0x33 3M 4k", "write -P 0x44 3584k 100k", fmt="qcow2")
    qemu_img("bitmap", "--disable", d / "top.qcow2", "b1")
    with open(d / "odd.raw", "wb") as f:  # data, a hole, data up to the unaligned end
        f.write(b"\x61" * 4096)
        f.seek(ODD_SIZE - 1000)
        f.write(b"\x62" * 1000)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if missing := nbd.missing_clients():
        pytest.skip(f"needs {', '.join(missing)} (run scripts/setup to install them)")
    d = tmp_path_factory.mktemp("nbd-source") / "src"
    build_source(d)
    assert qemu_bitmaps(d / "top.qcow2") == [
        {"flags": ["auto"], "name": "b0", "granularity": 65536},
        {"flags": [], "name": "b1", "granularity": 4096}]
    assert peers.nbd_dirty_runs(d / "top.qcow2", "b0") == B0_DIRTY
    assert peers.nbd_dirty_runs(d / "top.qcow2", "b1") == B1_DIRTY
    return d


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if missing := nbd.missing_clients():
        pytest.skip(f"needs {', '.join(missing)} (run scripts/setup to install them)")
    return nbd.make_x509(tmp_path_factory.mktemp("nbd-pki") / "pki")


@pytest.fixture(params=nbd.KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The server under test (the reference is always qemu-nbd)."""
    if request.param == "dirtybits" and not nbd.dirtybits_has_nbd():
        pytest.skip("this checkout's CLI has no `dirtybits nbd` yet")
    return str(request.param)


class Pair:
    """Separate copies of the source (``ref/`` for qemu-nbd, ``got/`` for the server under
    test) and a way to run one client against both."""

    def __init__(self, kind: str, source: Path, tmp_path: Path) -> None:
        self.kind = kind
        self.ref, self.got = tmp_path / "ref", tmp_path / "got"
        for d in (self.ref, self.got):
            shutil.copytree(source, d)

    def dirs(self) -> Iterator[tuple[str, Path]]:
        yield "qemu-nbd", self.ref
        yield self.kind, self.got

    def run(self, image: str, client: Callable[[Served, Path], T], **serve: Any) -> list[T]:
        """``client(server, its directory)`` against qemu-nbd serving ``ref/IMAGE``, then
        against the server under test serving ``got/IMAGE``: [reference, result]."""
        out = []
        for kind, d in self.dirs():
            with nbd.serve(kind, d / image, cwd=d, **serve) as srv:
                out.append(client(srv, d))
        return out


@pytest.fixture
def pair(kind: str, source: Path, tmp_path: Path) -> Pair:
    return Pair(kind, source, tmp_path)


def diff(ref: object, got: object, where: str = "") -> list[str]:
    """Where ``got`` differs from ``ref``: a unified diff of each differing text (in dicts,
    lists and tuples, by key or index), else the two values."""
    if isinstance(ref, dict) and isinstance(got, dict) and ref.keys() == got.keys():
        return [d for k in ref for d in diff(ref[k], got[k], f"{where}[{k!r}]")]
    if isinstance(ref, (list, tuple)) and isinstance(got, (list, tuple)) \
            and len(ref) == len(got) and not all(isinstance(x, int) for x in ref):
        return [d for i, (r, g) in enumerate(zip(ref, got, strict=True))
                for d in diff(r, g, f"{where}[{i}]")]
    if ref == got:
        return []
    if isinstance(ref, str) and isinstance(got, str):
        lines = difflib.unified_diff(ref.splitlines(), got.splitlines(), "qemu-nbd", "ours",
                                     lineterm="", n=2)
        return [f"{where}:", *lines]
    return [f"{where}: qemu-nbd {ref!r:.2000}", f"{where}:     ours {got!r:.2000}"]


def same(ref: T, got: T, what: str = "") -> None:
    """``got`` (the server under test) equals ``ref`` (qemu-nbd), or a failure that shows
    where they differ."""
    if got != ref:
        pytest.fail(f"{what}: the server under test differs from qemu-nbd\n"
                    + "\n".join(diff(ref, got)), pytrace=False)


def scrubbed(done: peers.Done, srv: Served) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of a client run, this server's address taken out."""
    return done.returncode, srv.scrub(done.stdout), srv.scrub(done.stderr)


def bytes_at(data: bytes) -> tuple[int, str]:
    """Length and digest of ``data``, for a short failure message."""
    return len(data), hashlib.sha256(data).hexdigest()


STATS = re.compile(r"^\S+ (bytes|KiB|MiB|GiB), \d+ ops; .*sec.*$\n?", re.M)


def no_timings(text: str) -> str:
    """qemu-io's output without its per-command rate line (``128 KiB, 1 ops; 00.00 sec
    (449.686 MiB/sec ...)``), the one part that changes from run to run."""
    return STATS.sub("", text)


# ---------------------------------------------------------------------------- nbdinfo
CONFIGS = {  # serve() keywords: export name, description, bitmaps, -A, read-only or not
    "ro-all": dict(image="top.qcow2", name="exp", bitmaps=["b0", "b1"],
                   options=["-A", "-D", "the source image"]),
    "ro-shared": dict(image="top.qcow2", options=["-e", "2"]),
    "rw": dict(image="top.qcow2", name="w", readonly=False, options=["-A"]),
    "raw-odd": dict(image="odd.raw", fmt="raw"),
}


@pytest.mark.timeout(60)
@TRANSPORT
@pytest.mark.parametrize("config", list(CONFIGS))
def test_nbdinfo_describes_the_export_alike(pair: Pair, tcp: bool, config: str) -> None:
    conf = dict(CONFIGS[config])
    image = str(conf.pop("image"))
    queries = [("--list",), ("--list", "--json"), ("--size",), ("--size", "--json"), ()]
    queries += [("--json",)]
    queries += [("--can", c) for c in ("connect", "read", "write", "flush", "fua", "trim",
                                       "zero", "fast-zero", "df", "multi-conn", "cache",
                                       "structured-reply")]
    queries += [("--is", c) for c in ("read-only", "rotational", "tls")]

    def client(srv: Served, _: Path) -> dict[str, tuple[int, str, str]]:
        return {" ".join(q): scrubbed(nbd.nbdinfo(*q, srv.uri, ok=(0, 2)), srv)
                for q in queries}

    ref, got = pair.run(image, client, tcp=tcp, **conf)
    same(ref, got, f"nbdinfo on {config}")
    size = SIZE if image == "top.qcow2" else ODD_SIZE + 17  # qemu-nbd rounds up to 512
    assert ref["--size"][1] == f"{size}\n"
    assert ref["--is read-only"][0] == (2 if conf.get("readonly") is False else 0)
    if config == "ro-all":
        contexts = json.loads(ref["--json"][1])["exports"][0]["contexts"]
        assert contexts == ["base:allocation", "qemu:allocation-depth",
                            "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"]  # -B reversed


MAPS = [("base:allocation",), ("qemu:allocation-depth",), ("qemu:dirty-bitmap:b0",)]


@pytest.mark.timeout(60)
@TRANSPORT
@pytest.mark.parametrize("bitmaps", [["b0"], ["b0", "b1"]], ids=["b0", "b0+b1"])
def test_nbdinfo_maps_alike(pair: Pair, tcp: bool, bitmaps: list[str]) -> None:
    contexts = ["base:allocation", "qemu:allocation-depth",
                *(f"qemu:dirty-bitmap:{b}" for b in bitmaps)]

    def client(srv: Served, _: Path) -> dict[str, tuple[int, str, str]]:
        return {f"{c} {' '.join(x)}": scrubbed(nbd.nbdinfo(f"--map={c}", *x, srv.uri), srv)
                for c in contexts for x in ((), ("--json",), ("--totals",),
                                            ("--totals", "--json"))}

    ref, got = pair.run("top.qcow2", client, tcp=tcp, bitmaps=bitmaps, options=["-A"])
    same(ref, got, "nbdinfo --map")
    dirty = [(e["offset"], e["length"]) for e in
             json.loads(ref["qemu:dirty-bitmap:b0 --json"][1]) if e["type"] == 1]
    assert dirty == B0_DIRTY


@pytest.mark.timeout(60)
def test_map_of_the_unaligned_raw_alike(pair: Pair) -> None:
    def client(srv: Served, _: Path) -> list[tuple[int, str, str]]:
        return [scrubbed(nbd.nbdinfo("--map", *x, srv.uri), srv)
                for x in ((), ("--json",), ("--totals",))]

    ref, got = pair.run("odd.raw", client, fmt="raw")
    same(ref, got, "nbdinfo --map of odd.raw")
    # the 17 bytes qemu-nbd pads the export with read as a hole
    assert ref[0][1].splitlines()[-1].split() == [str(ODD_SIZE), "17", "3", "hole,zero"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", ["qemu:dirty-bitmap:b1", "qemu:allocation-depth",
                                     "qemu:dirty-bitmap:nope", "base:nope"])
def test_map_of_a_context_not_offered_fails_alike(pair: Pair, context: str) -> None:
    def client(srv: Served, _: Path) -> tuple[int, str, str]:
        return scrubbed(nbd.nbdinfo(f"--map={context}", srv.uri, ok=None), srv)

    ref, got = pair.run("top.qcow2", client, bitmaps=["b0"])
    same(ref, got, f"nbdinfo --map={context} through -B b0")
    assert ref == (1, "", f'nbdinfo: --map: server does not support metadata context '
                          f'"{context}"\n')


# ---------------------------------------------------------------------------- nbdcopy
@pytest.mark.timeout(90)
@TRANSPORT
@pytest.mark.parametrize("image,fmt", [("top.qcow2", "qcow2"), ("odd.raw", "raw")])
def test_nbdcopy_out_of_and_into_an_export(pair: Pair, tcp: bool, image: str,
                                           fmt: str) -> None:
    def copy_out(srv: Served, d: Path) -> bytes:
        nbd.nbdcopy(srv.uri, d / "out.raw")
        return (d / "out.raw").read_bytes()

    ref, got = pair.run(image, copy_out, fmt=fmt, tcp=tcp)
    same(bytes_at(ref), bytes_at(got), "nbdcopy out of the export")
    flat = pair.ref / "flat.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", pair.ref / image, flat)
    assert ref == flat.read_bytes()[:len(ref)].ljust(len(ref), b"\0")

    # into a writable export: an empty qcow2 of the export's size with a recording bitmap
    size = len(ref)
    for _, d in pair.dirs():
        qemu_img("create", "-q", "-f", "qcow2", d / "into.qcow2", str(size))
        qemu_img("bitmap", "--add", d / "into.qcow2", "b0")

    def copy_in(srv: Served, d: Path) -> tuple[int, str, str]:
        return scrubbed(nbd.nbdcopy(d / "out.raw", srv.uri), srv)

    ref_in, got_in = pair.run("into.qcow2", copy_in, readonly=False, tcp=tcp)
    same(ref_in, got_in, "nbdcopy into the export")
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", pair.ref / "into.qcow2",
             pair.got / "into.qcow2")
    for _, d in pair.dirs():
        qemu_img("check", d / "into.qcow2")
        qemu_img("compare", "-f", "qcow2", "-F", "raw", d / "into.qcow2", d / "out.raw")
    same(peers.nbd_map(pair.ref / "into.qcow2", "b0"), peers.nbd_map(pair.got / "into.qcow2",
                                                                     "b0"), "b0 after nbdcopy")
    same(qemu_img("map", "--output=json", pair.ref / "into.qcow2").stdout,
         qemu_img("map", "--output=json", pair.got / "into.qcow2").stdout,
         "what nbdcopy allocated")


# ---------------------------------------------------------------------------- qemu-img
@pytest.mark.timeout(90)
@TRANSPORT
def test_qemu_img_reads_the_export_alike(pair: Pair, tcp: bool) -> None:
    def client(srv: Served, d: Path) -> dict[str, object]:
        out: dict[str, object] = {}
        qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri, d / "conv.raw")
        out["convert"] = bytes_at((d / "conv.raw").read_bytes())
        out["compare top"] = scrubbed(qemu_img("compare", "-f", "raw", "-F", "qcow2", srv.uri,
                                               d / "top.qcow2", ok=None), srv)
        out["compare base"] = scrubbed(qemu_img("compare", "-f", "raw", "-F", "qcow2",
                                                srv.uri, d / "base.qcow2", ok=None), srv)
        out["map"] = qemu_img("map", "--output=json", "-f", "raw", srv.uri).stdout
        for key, ctx in (("map b0", "qemu:dirty-bitmap:b0"),
                         ("map depth", "qemu:allocation-depth")):
            out[key] = scrubbed(qemu_img("map", "--output=json", "--image-opts", srv.image_opts(
                f"x-dirty-bitmap={ctx}"), ok=None), srv)
        out["info"] = srv.scrub(qemu_img("info", "--output=json", "-f", "raw",
                                         srv.uri).stdout)
        return out

    ref, got = pair.run("top.qcow2", client, tcp=tcp, name="exp", bitmaps=["b0"],
                        options=["-A"])
    for key in ref:
        same(ref[key], got[key], f"qemu-img {key}")
    assert ref["compare top"] == (0, "Images are identical.\n", "")
    assert ref["compare base"][0] == 1  # the reference tells the two apart
    # x-dirty-bitmap shows dirty areas as "not present": QEMU's inverted reporting
    map_b0 = ref["map b0"]
    assert isinstance(map_b0, tuple) and map_b0[0] == 0, map_b0
    absent = [(e["start"], e["length"]) for e in json.loads(map_b0[1]) if not e["present"]]
    assert absent == B0_DIRTY


# ---------------------------------------------------------------------------- qemu-io
READS = ["read -P 0x11 0 64k", "read -P 0x5a 64k 128k", "read -P 0x11 192k 320k",
         "read -P 0 512k 1536k", "read -P 0x22 2M 256k", "read -P 0x33 3M 4k",
         "read -P 0 3076k 60k", "read -P 0x44 3584k 100k", "read -P 0 3684k 412k",
         "read -P 0x5a 65537 511", "read -P 0x11 4000 12345"]
WRITES = ["write -P 0x71 4k 4k", "write -P 0x72 200000 70000", "write -z 2M 64k",
          "write -z 2200k 1k", "write -P 0 2600k 64k", "discard 448k 64k",
          "discard 3M 4k", "write -P 0x73 4190000 4304", "flush",
          "read -P 0x71 4k 4k", "read -P 0x72 200000 70000", "read -P 0 2M 64k"]


@pytest.mark.timeout(90)
@TRANSPORT
def test_qemu_io_reads_alike(pair: Pair, tcp: bool) -> None:
    def client(srv: Served, _: Path) -> tuple[int, str, str]:
        done = qemu_io(srv.uri, *READS, fmt="raw", readonly=True)
        return done.returncode, no_timings(done.stdout), done.stderr

    ref, got = pair.run("top.qcow2", client, tcp=tcp)
    same(ref, got, "qemu-io reads")
    wrong = qemu_io(pair.ref / "top.qcow2", "read -P 0x5a 0 64k", fmt="qcow2", ok=(1,))
    assert "Pattern verification failed" in wrong.stdout  # the -P checks can fail


@pytest.mark.timeout(120)
@TRANSPORT
@pytest.mark.parametrize("options", [[], ["--discard=unmap"],
                                     ["--discard=unmap", "--detect-zeroes=unmap"],
                                     ["--detect-zeroes=on"]],
                         ids=["default", "discard", "detect-zeroes-unmap", "detect-zeroes"])
def test_qemu_io_writes_mark_the_recording_bitmap_alike(pair: Pair, tcp: bool,
                                                         options: list[str]) -> None:
    """Writes through a writable export: the image, its allocation and its recording bitmap
    b0 (exported live, ``-B b0``, which qemu-nbd 7.2 allows on a writable export) end up as
    qemu-nbd leaves them; the disabled b1 does not move."""

    def client(srv: Served, _: Path) -> tuple[int, str, str, str]:
        done = qemu_io(srv.uri, *WRITES, fmt="raw")
        live = nbd.nbdinfo("--map=qemu:dirty-bitmap:b0", srv.uri).stdout
        return done.returncode, no_timings(done.stdout), done.stderr, live

    ref, got = pair.run("top.qcow2", client, tcp=tcp, readonly=False, bitmaps=["b0"],
                        options=options)
    same(ref, got, "qemu-io writes")
    for _, d in pair.dirs():
        qemu_img("check", d / "top.qcow2")
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", pair.ref / "top.qcow2",
             pair.got / "top.qcow2")
    same(qemu_bitmaps(pair.ref / "top.qcow2"), qemu_bitmaps(pair.got / "top.qcow2"),
         "bitmaps after")
    for b in ("b0", "b1"):
        same(peers.nbd_map(pair.ref / "top.qcow2", b), peers.nbd_map(pair.got / "top.qcow2", b),
             f"{b} after the writes")
    same(qemu_img("map", "--output=json", pair.ref / "top.qcow2").stdout,
         qemu_img("map", "--output=json", pair.got / "top.qcow2").stdout, "allocation after")
    assert ref[3] == peers.nbd_map(pair.ref / "top.qcow2", "b0")  # live map = stored map
    assert peers.nbd_dirty_runs(pair.ref / "top.qcow2", "b1") == B1_DIRTY
    dirty = peers.nbd_dirty_runs(pair.ref / "top.qcow2", "b0")
    assert dirty != B0_DIRTY and (0, 64 << 10) in [(o, min(n, 64 << 10)) for o, n in dirty]


# ---------------------------------------------------------------------------- libnbd
PROBE = r'''
import hashlib, json, sys
import nbd

uri, contexts = sys.argv[1], [c for c in sys.argv[2].split(",") if c]
ranges, writes = json.loads(sys.argv[3]), json.loads(sys.argv[4])


def handle(*meta):
    h = nbd.NBD()
    h.set_full_info(True)
    for m in meta:
        h.add_meta_context(m)
    h.connect_uri(uri)
    return h


def maybe(f, *args):
    try:
        return f(*args)
    except nbd.Error as e:
        return f"error: {e}"


out = {}
h = handle(*contexts)
size = h.get_size()
out["size"] = size
out["protocol"] = h.get_protocol()
out["handshake_flags"] = h.get_handshake_flags()
out["structured"] = h.get_structured_replies_negotiated()
out["tls"] = h.get_tls_negotiated()
out["canonical_name"] = maybe(h.get_canonical_export_name)
out["description"] = maybe(h.get_export_description)
out["flags"] = {f: getattr(h, f)() for f in (
    "is_read_only", "is_rotational", "can_cache", "can_df", "can_fast_zero", "can_flush",
    "can_fua", "can_multi_conn", "can_trim", "can_zero")}
out["meta"] = {c: h.can_meta_context(c) for c in (
    "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0",
    "qemu:dirty-bitmap:b1")}
out["block_size"] = [h.get_block_size(s) for s in
                     (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
out["writes"] = []
for kind, off, arg in writes:
    if kind == "pwrite":
        out["writes"].append(maybe(h.pwrite, bytes([arg[0]]) * arg[1], off))
    elif kind == "zero":
        out["writes"].append(maybe(h.zero, arg, off))
    elif kind == "trim":
        out["writes"].append(maybe(h.trim, arg, off))
if writes:
    out["writes"].append(maybe(h.flush))
digest = hashlib.sha256()
for off in range(0, size, 1 << 20):
    digest.update(h.pread(min(1 << 20, size - off), off))
out["sha256"] = digest.hexdigest()
out["reads"] = [maybe(lambda o, n: h.pread(n, o).hex(), off, n) for off, n in ranges]
chunks = []


def chunk(buf, off, status, err):
    chunks.append([off, len(buf), status])
    return 0


for off in range(0, size, 1 << 20):
    h.pread_structured(min(1 << 20, size - off), off, chunk)
out["chunks"] = chunks
h.shutdown()

out["replies"], out["req_one"] = {}, {}
for c in contexts:
    h = handle(c)
    replies, off = [], 0

    def extents(meta, start, entries, err):
        replies.append([meta, start, list(entries)])
        return 0

    while off < size:
        n = len(replies)
        h.block_status(size - off, off, extents)
        off += sum(e for r in replies[n:] if r[0] == c for e in r[2][::2])
    out["replies"][c] = replies
    # REQ_ONE (QEMU's own client asks so): from each extent's start, and from odd offsets
    starts = sorted({r[1] + sum(r[2][:i:2]) for r in replies if r[0] == c
                     for i in range(0, len(r[2]), 2)} | {100, 70000, size - 1})
    one = []
    for start in starts:
        for n in (size - start, 1000):
            got = []
            res = maybe(h.block_status, min(n, size - start), start,
                        lambda m, o, e, err: got.append([m, o, list(e)]) or 0,
                        nbd.CMD_FLAG_REQ_ONE)
            one.append([start, n, got if res is None else res])
    out["req_one"][c] = one
    h.shutdown()
print(json.dumps(out))
'''


def merged(replies: list[list[Any]]) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of the extents in block-status replies, adjacent extents of the
    same flags joined: what they say, whatever the server's chunking."""
    out: list[tuple[int, int, int]] = []
    for _, start, entries in replies:
        off = start
        for length, flags in zip(entries[::2], entries[1::2], strict=True):
            if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + length, flags)
            else:
                out.append((off, length, flags))
            off += length
    return out


def probe(srv: Served, contexts: list[str], ranges: list[tuple[int, int]],
          writes: Sequence[Any] = ()) -> dict[str, Any]:
    """What the PROBE script sees through ``srv`` (after ``writes``)."""
    return dict(json.loads(nbd.libnbd(PROBE, srv.uri, ",".join(contexts),
                                      json.dumps(ranges), json.dumps(list(writes)))))


def compare_probes(ref: dict[str, Any], got: dict[str, Any]) -> None:
    """What the replies say first (a clearer failure), then exactly how block status was
    cut (structured reads: only what they say)."""
    for key in ref:
        if key in ("replies", "req_one", "chunks"):
            continue
        same(ref[key], got[key], f"libnbd {key}")
    for c in ref["replies"]:
        same(merged(ref["replies"][c]), merged(got["replies"][c]), f"extents of {c}")
    same(ref["replies"], got["replies"], "block-status replies, as cut by the server")
    same(ref["req_one"], got["req_one"], "block-status replies to REQ_ONE ([offset, "
         "count, replies or error])")
    # How a server cuts a read into chunks is its own business (the protocol lets it send
    # any chunking; dirtybits sends one chunk per data or hole run, and page-cache runs of a
    # read-only image as their own chunks, where qemu-nbd cuts at each block-status answer):
    # what the chunks say must be the same.
    same(joined(ref["chunks"]), joined(got["chunks"]), "structured read: data and holes")


def joined(chunks: list[list[int]]) -> list[tuple[int, int, int]]:
    """Structured-read chunks ``[offset, length, status]``, adjacent ones of the same status
    joined: where the server says data and where holes, whatever its chunking."""
    out: list[tuple[int, int, int]] = []
    for off, n, st in chunks:
        if out and out[-1][2] == st and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, st)
        else:
            out.append((off, n, st))
    return out


RANGES = [(0, 1), (65535, 3), (524287, 2), (SIZE - 4, 4), (SIZE - 1, 1), (SIZE, 1),
          (SIZE - 2, 4), (1000, 0)]


@pytest.mark.timeout(90)
@TRANSPORT
def test_libnbd_sees_the_read_only_export_alike(pair: Pair, tcp: bool) -> None:
    contexts = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
    ref, got = pair.run("top.qcow2", lambda srv, _: probe(srv, contexts, RANGES), tcp=tcp,
                        name="exp", bitmaps=["b0"], options=["-A", "-D", "desc"])
    compare_probes(ref, got)
    b0 = [(o, n) for o, n, f in merged(ref["replies"]["qemu:dirty-bitmap:b0"]) if f == 1]
    assert b0 == B0_DIRTY
    assert ref["size"] == SIZE and ref["flags"]["is_read_only"] is True
    assert ref["reads"][1] == "115a5a" and ref["reads"][5].startswith("error: ")


@pytest.mark.timeout(90)
@TRANSPORT
def test_libnbd_writes_alike(pair: Pair, tcp: bool) -> None:
    writes = [["pwrite", 5000, [0x81, 3000]], ["pwrite", 1 * MiB + 4095, [0x82, 2]],
              ["zero", 2 * MiB + 512, 1024], ["trim", 3584 << 10, 64 << 10],
              ["pwrite", SIZE - 1, [0x83, 2]], ["zero", SIZE - 512, 1024]]
    contexts = ["base:allocation", "qemu:dirty-bitmap:b0"]
    ref, got = pair.run(
        "top.qcow2", lambda srv, _: probe(srv, contexts, RANGES, writes), tcp=tcp,
        readonly=False, bitmaps=["b0"], options=["--discard=unmap"])
    compare_probes(ref, got)
    assert ref["writes"][-2].startswith("error: ")  # past the end
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", pair.ref / "top.qcow2",
             pair.got / "top.qcow2")
    for _, d in pair.dirs():
        qemu_img("check", d / "top.qcow2")
    same(peers.nbd_map(pair.ref / "top.qcow2", "b0"), peers.nbd_map(pair.got / "top.qcow2",
                                                                     "b0"), "b0 after")


# ---------------------------------------------------------------------------- TLS
@pytest.mark.timeout(120)
@TRANSPORT
def test_tls_alike(pair: Pair, certs: Path, tcp: bool) -> None:
    tls = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={certs}",
           "--tls-creds", "tls0"]
    client_obj = ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"]

    def client(srv: Served, d: Path) -> dict[str, object]:
        out: dict[str, object] = {}
        out["nbdinfo"] = scrubbed(nbd.nbdinfo(srv.tls_uri(certs)), srv)
        out["map"] = nbd.nbdinfo("--map=qemu:dirty-bitmap:b0", srv.tls_uri(certs)).stdout
        opts = srv.image_opts("tls-creds=tls0", *(["tls-hostname=localhost"] if not tcp
                                                  else []))
        out["info"] = srv.scrub(qemu_img("info", "--output=json", *client_obj,
                                         "--image-opts", opts).stdout)
        qemu_img("convert", *client_obj, "--image-opts", opts, "-O", "raw", d / "tls.raw")
        out["convert"] = bytes_at((d / "tls.raw").read_bytes())
        # refused: a plaintext client, a TLS client without a certificate, QEMU without TLS
        plain = nbd.nbdinfo(srv.uri, ok=None)
        out["plain"] = plain.returncode, srv.scrub(plain.stdout)
        out["no cert"] = nbd.nbdinfo(srv.tls_uri(d / "nowhere"), ok=None).returncode
        out["qemu plain"] = qemu_img("info", "--image-opts", srv.image_opts(), ok=None
                                     ).returncode
        return out

    ref, got = pair.run("top.qcow2", client, tcp=tcp, bitmaps=["b0"], options=tls)
    for key in ref:
        same(ref[key], got[key], f"over TLS: {key}")
    assert "with TLS" in str(ref["nbdinfo"])
    assert ref["plain"] == (1, "protocol: newstyle-fixed without TLS, using simple packets\n")
    assert ref["no cert"] == 1 and ref["qemu plain"] == 1
    flat = pair.ref / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", pair.ref / "top.qcow2", flat)
    assert ref["convert"] == bytes_at(flat.read_bytes())


# ---------------------------------------------------------------------------- pull backup
INCREMENTAL = r'''
import json, sys
import nbd

src_uri, dst_uri = sys.argv[1], sys.argv[2]
src = nbd.NBD()
src.add_meta_context("qemu:dirty-bitmap:b0")
src.connect_uri(src_uri)
dst = nbd.NBD()
dst.connect_uri(dst_uri)
size, off, dirty = src.get_size(), 0, []


def extents(meta, start, entries, err):
    global off
    for length, flags in zip(entries[::2], entries[1::2]):
        if meta == "qemu:dirty-bitmap:b0":
            if flags & 1:
                dirty.append([off, length])
            off += length
    return 0


while off < size:
    src.block_status(size - off, off, extents)
copied = 0
for start, length in dirty:
    for o in range(start, start + length, 1 << 20):
        n = min(1 << 20, start + length - o)
        dst.pwrite(src.pread(n, o), o)
        copied += n
dst.flush()
print(json.dumps({"dirty": dirty, "read": copied}))
'''


@pytest.mark.timeout(180)
def test_pull_backup_full_then_incremental(pair: Pair) -> None:
    """A full copy, writes through a writable export that record in b0, then the incremental:
    only b0's dirty ranges read from the source (a read-only export of b0) and written into
    the copy (a writable export of it) leave the copy identical to the source, having read
    exactly b0's dirty bytes."""
    kind, d = pair.kind, pair.got
    src, backup = d / "top.qcow2", d / "backup.qcow2"
    qemu_img("bitmap", "--clear", src, "b0")  # the full backup starts a new generation
    with nbd.serve(kind, src, cwd=d) as srv:
        qemu_img("convert", "-f", "raw", "-O", "qcow2", srv.uri, backup)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", backup, src)

    with nbd.serve(kind, src, cwd=d, readonly=False) as srv:
        qemu_io(srv.uri, "write -P 0x91 100k 10k", "write -z 1500k 4k",
                "write -P 0x92 2M 200k", "write -P 0x93 4194000 304", fmt="raw")
    expected = [(64 << 10, 64 << 10), (1472 << 10, 64 << 10), (2 * MiB, 256 << 10),
                (SIZE - (64 << 10), 64 << 10)]
    assert peers.nbd_dirty_runs(src, "b0") == expected  # qemu's own reading
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", backup, src, ok=(1,))

    with nbd.serve(kind, src, cwd=d, bitmaps=["b0"]) as srv, \
            nbd.serve(kind, backup, cwd=d, readonly=False, tcp=True) as dst:
        done = json.loads(nbd.libnbd(INCREMENTAL, srv.uri, dst.uri))
    assert [tuple(e) for e in done["dirty"]] == expected
    assert done["read"] == sum(n for _, n in expected)
    qemu_img("check", backup)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", backup, src)

