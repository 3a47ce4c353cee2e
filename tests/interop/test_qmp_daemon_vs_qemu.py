"""``dirtybits serve`` against QEMU itself: one QMP script, run against
``qemu-system-x86_64 -M none -nodefaults`` and against our daemon on copies of the same images,
must get the same replies, leave the same bitmaps (``x-debug-block-dirty-bitmap-sha256`` of
each before quit) and, after both quit, the same images on disk (``qemu-img info``/``check``,
``qemu-img compare`` of the data, the dirty extents through ``qemu-nbd -B`` + ``nbdinfo``).

The images (built once per module by qemu-img and qemu-io):

- ``a.qcow2``: a fresh 64 MiB qcow2;
- ``b.qcow2``: 64 MiB, bitmaps ``pb0`` (64 KiB), ``pb1`` (128 KiB) and ``pb2`` (disabled) made
  by ``qemu-img bitmap``, then 1 MiB written by qemu-io (recorded by pb0 and pb1);
- ``c.qcow2``: 64 MiB, bitmaps ``iu0`` and ``iu1`` left ``in-use`` by a qemu-io killed with
  SIGKILL after a write (inconsistent: they can only be removed);
- ``d.qcow2``: a copy of ``b.qcow2``, added read-only (its bitmaps are readonly);
- ``e.qcow2``: a fresh 64 MiB qcow2 (added with ``discard=unmap`` and ``cache.direct=on``);
- ``r.raw``: 16 MiB raw, its first MiB written.

What is normalized before comparing (``normalize``), and why:

- auto node names ``#blockNNN`` -> ``#block`` (QEMU numbers them from a process-wide counter);
- the ``x-dirtybits`` key of every ``dirty-bitmaps`` entry (ours only; checked to be there);
- ``actual-size`` (allocation on the host file system);
- the side's image directory in every string (paths in replies and error texts) -> ``@D``;
- ``query-version``: the version and package (QEMU 7.2.x, Debian's package string);
- the order of ``query-named-block-nodes``' list: sorted by node name (QEMU lists the newest
  node first, we list the oldest first: a bug, see ``DIFFERENCES`` below);
- ``image.virtual-size`` of ``file`` (protocol) nodes: the image file's length, which depends on
  where each writer put its clusters (QEMU writes bitmaps at close, we at checkpoints); QEMU
  rounds it up to 512 bytes and we do not: a bug, see ``DIFFERENCES``;
- ``image.format-specific.data.bitmaps`` of open qcow2 nodes (the on-disk bitmap directory while
  the image is open): QEMU sets ``in-use`` on every bitmap at a read-write open, writes new
  persistent bitmaps and the ``auto`` flag only at close; dirtybits writes them at once and sets
  ``in-use`` only between a write and the next checkpoint (README, "Tracking writes"). The
  directory is compared after both quit, with ``qemu-img info``;
- after both quit, the order of that directory: QEMU appends the bitmaps new in a session at
  close, newest first ([d0, p0]); we store each one when it is added ([p0, d0]);
- in HMP ``qemu-io`` output on stdout, the timing part of the statistics lines
  (``...; 00.00 sec (1.2 MiB/sec and 20.5 ops/sec)``).

The daemon's own additions (``block-dirty-bitmap-copy``/``-edit``, ``x-dirtybits-checkpoint``,
``x-mode``) are not in QEMU; they are tested in tests/unit/test_qmp_daemon.py.

Cases where dirtybits differs on purpose (documented limitations of its graph or its safer
choices) are run against our daemon alone (``test_documented_divergences``); cases where it
differs by mistake are strict xfails (``DIFFERENCES``), each one a short script compared in
full: they start passing (and so failing as xfails) when the bug is fixed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

import peers
import peers.qmp

pytestmark = pytest.mark.interop

MiB = 1 << 20
QMP_SHELL = Path(sys.executable).with_name("qmp-shell")  # qemu.qmp's, beside our python

Step = tuple[str, dict[str, Any] | None]
Server = Callable[[], AbstractAsyncContextManager[peers.qmp.Qemu]]

#: Commands of ours that QEMU 7.2 does not have.
EXTENSIONS = {"block-dirty-bitmap-copy", "block-dirty-bitmap-edit", "x-dirtybits-checkpoint"}


class Differs(AssertionError):
    """The two servers answered a script differently (what the xfails expect)."""


# ------------------------------------------------------------------------ the images
def _in_use_image(path: Path) -> None:
    """``c.qcow2``: two bitmaps left in-use by a qemu-io killed -9 after a write (a read-write
    open marks every bitmap in-use; only a clean close stores them again)."""
    peers.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    for name in ("iu0", "iu1"):
        peers.qemu_img("bitmap", "--add", path, name)
    proc = peers.session("qemu-io", "-f", "qcow2", path)
    peers.kill_after(proc, ["write -P 0x33 0 64k"], "wrote 65536/65536")
    flags = {b["name"]: b["flags"] for b in peers.qemu_bitmaps(path)}
    assert flags == {"iu0": ["in-use", "auto"], "iu1": ["in-use", "auto"]}, flags


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for name in ("a.qcow2", "e.qcow2"):
        peers.qemu_img("create", "-q", "-f", "qcow2", d / name, "64M")
    b = d / "b.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", b, "64M")
    peers.qemu_img("bitmap", "--add", b, "pb0")
    peers.qemu_img("bitmap", "--add", "-g", "128k", b, "pb1")
    peers.qemu_img("bitmap", "--add", "--disable", b, "pb2")
    peers.qemu_io(b, "write -P 0x5a 0 1M", fmt="qcow2")
    shutil.copyfile(b, d / "d.qcow2")
    _in_use_image(d / "c.qcow2")
    with open(d / "r.raw", "wb") as f:
        f.truncate(16 * MiB)
    peers.qemu_io(d / "r.raw", "write -P 0x77 0 1M", fmt="raw")
    return d


def side(images: Path, where: Path) -> Path:
    """A fresh copy of every image for one server."""
    where.mkdir()
    for f in images.iterdir():
        shutil.copyfile(f, where / f.name)
    return where


# ------------------------------------------------------------------------ normalization
_AUTO = re.compile(r"#block\d+")
_STATS = re.compile(r"(, \d+ ops); .*$", re.M)


def _text(s: str, d: Path) -> str:
    return _AUTO.sub("#block", s.replace(str(d), "@D"))


def normalize(value: Any, d: Path, *, ours: bool, exact: bool = False) -> Any:
    """A reply with the documented differences taken out (the module docstring lists them);
    ``exact`` keeps the two that hide bugs (node order, file nodes' virtual-size)."""
    if isinstance(value, str):
        return _text(value, d)
    if isinstance(value, list):
        items = [normalize(v, d, ours=ours, exact=exact) for v in value]
        if not exact and items and all(isinstance(v, dict) and "node-name" in v and "drv" in v
                                       for v in items):  # query-named-block-nodes
            items.sort(key=lambda v: (v["node-name"], v["file"]))
        return items
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, v in value.items():
        if key == "dirty-bitmaps":
            for entry in v:
                assert ("x-dirtybits" in entry) == ours, entry
        if key in ("x-dirtybits", "actual-size"):
            continue
        out[key] = normalize(v, d, ours=ours, exact=exact)
    if "drv" in out and "image" in out:  # a BlockDeviceInfo
        img = out["image"]
        if out["drv"] == "file" and not exact:
            img.pop("virtual-size", None)
        img.get("format-specific", {}).get("data", {}).pop("bitmaps", None)
    if "qemu" in out and "package" in out:  # query-version
        assert out["qemu"]["major"] == 7 and out["qemu"]["minor"] == 2, out
        out = {"qemu": "7.2", "package": "-"}
    return out


def hmp_output(stdout: str, d: Path) -> str:
    return _STATS.sub(r"\1; <time>", _text(stdout, d))


# ------------------------------------------------------------------------ running a script
@dataclass
class Transcript:
    replies: list[Any]  # per step: ["return", value] or ["error", class, desc], normalized
    sha256: dict[str, str]  # "node/bitmap" -> x-debug-block-dirty-bitmap-sha256, at the end
    stdout: str  # HMP qemu-io output, normalized
    status: int  # exit status after quit


def _args(value: Any, d: Path) -> Any:
    if isinstance(value, str):
        return value.replace("@D", str(d))
    if isinstance(value, list):
        return [_args(v, d) for v in value]
    if isinstance(value, dict):
        return {k: _args(v, d) for k, v in value.items()}
    return value


async def run_script(server: Server, d: Path, steps: list[Step], *,
                     exact: bool = False) -> Transcript:
    """Run ``steps`` (``@D`` in a string is the image directory ``d``), then the sha256 of
    every bitmap of every node, then quit."""
    ours = server is peers.qmp.dirtybits_serve
    replies: list[Any] = []
    sha: dict[str, str] = {}
    async with server() as vm:
        for cmd, args in steps:
            try:
                value = await vm.execute(cmd, _args(args, d))
            except ExecuteError as exc:
                replies.append(["error", exc.error_class, _text(exc.error.error.desc, d)])
            else:
                replies.append(["return", normalize(value, d, ours=ours, exact=exact)])
        for node in await vm.execute("query-named-block-nodes", {"flat": True}):
            for bm in node.get("dirty-bitmaps", []):
                got = await vm.execute("x-debug-block-dirty-bitmap-sha256",
                                       {"node": node["node-name"], "name": bm["name"]})
                sha[f"{_text(node['node-name'], d)}/{bm['name']}"] = got["sha256"]
        status = await vm.quit()
        stdout = hmp_output(vm.stdout, d)
    return Transcript(replies, sha, stdout, status)


def _show(v: Any) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) < 1500 else text[:1500] + "..."


def _key(v: Any) -> Any:
    return (v.get("node-name"), v.get("file"), v.get("name")) if isinstance(v, dict) else None


def _paths(q: Any, o: Any, path: str = "") -> Iterator[str]:
    """Where two replies differ, member by member (list items of nodes and bitmaps matched by
    their names)."""
    if isinstance(q, dict) and isinstance(o, dict):
        for k in sorted(set(q) | set(o)):
            if k not in o:
                yield f"{path}.{k}: only QEMU has it: {_show(q[k])[:200]}"
            elif k not in q:
                yield f"{path}.{k}: only ours has it: {_show(o[k])[:200]}"
            else:
                yield from _paths(q[k], o[k], f"{path}.{k}")
    elif isinstance(q, list) and isinstance(o, list):
        qk, ok = [_key(v) for v in q], [_key(v) for v in o]
        if None in qk or None in ok or len(set(qk)) < len(qk) or len(set(ok)) < len(ok):
            if len(q) != len(o):
                yield f"{path}: QEMU {_show(q)[:300]}, ours {_show(o)[:300]}"
            for i, (x, y) in enumerate(zip(q, o, strict=False)):
                yield from _paths(x, y, f"{path}[{i}]")
            return
        if qk != ok:
            yield f"{path}: QEMU lists {qk}, ours {ok}"
        for k in qk:
            if k in ok:
                yield from _paths(q[qk.index(k)], o[ok.index(k)], f"{path}[{k[0] or k[2]}]")
    elif q != o:
        yield f"{path}: QEMU {_show(q)[:300]}, ours {_show(o)[:300]}"


Key = int | str  # a step's index, or "sha256", "status", "stdout"


def differences(steps: list[Step], qemu: Transcript, ours: Transcript) -> dict[Key, str]:
    """What differs: per step (its index), and the final sha256s, exit status and stdout."""
    out: dict[Key, str] = {}
    for i, (step, q, o) in enumerate(zip(steps, qemu.replies, ours.replies, strict=True)):
        if q != o and q[0] == o[0] == "return":
            out[i] = f"step {i} {step[0]} {_show(step[1])}:\n" + "\n".join(
                f"  {line}" for line in list(_paths(q[1], o[1]))[:40])
        elif q != o:
            out[i] = (f"step {i} {step[0]} {_show(step[1])}:\n  QEMU: {_show(q)}\n"
                      f"  ours: {_show(o)}")
    if qemu.sha256 != ours.sha256:
        out["sha256"] = f"bitmaps at the end:\n  QEMU: {qemu.sha256}\n  ours: {ours.sha256}"
    if qemu.status != ours.status:
        out["status"] = f"exit status after quit: QEMU {qemu.status}, ours {ours.status}"
    if qemu.stdout != ours.stdout:
        import difflib

        diff = "\n".join(difflib.unified_diff(qemu.stdout.splitlines(),
                                              ours.stdout.splitlines(), "QEMU", "ours",
                                              lineterm=""))
        out["stdout"] = f"HMP qemu-io output on stdout:\n{diff}"
    return out


async def both(images: Path, tmp: Path, steps: list[Step], *, exact: bool = False
               ) -> tuple[Transcript, Transcript, Path, Path]:
    qd, od = side(images, tmp / "qemu"), side(images, tmp / "ours")
    qemu = await run_script(peers.qmp.qemu_system, qd, steps, exact=exact)
    ours = await run_script(peers.qmp.dirtybits_serve, od, steps, exact=exact)
    return qemu, ours, qd, od


def report(diffs: dict[Key, str]) -> str:
    return f"{len(diffs)} difference(s) from QEMU:\n" + "\n".join(diffs.values())


# ------------------------------------------------------------------------ the script
def add(node: str, name: str, **kw: Any) -> Step:
    return ("block-dirty-bitmap-add", {"node": node, "name": name,
                                       **{k.replace("_", "-"): v for k, v in kw.items()}})


def bm(cmd: str, node: str, name: str) -> Step:
    return (f"block-dirty-bitmap-{cmd}", {"node": node, "name": name})


def merge(node: str, target: str, *sources: Any) -> Step:
    return ("block-dirty-bitmap-merge", {"node": node, "target": target,
                                         "bitmaps": list(sources)})


def hmp(line: str) -> Step:
    return ("human-monitor-command", {"command-line": line})


def io(node: str, cmd: str) -> Step:
    return hmp(f'qemu-io {node} "{cmd}"')


def act(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": f"block-dirty-bitmap-{kind}", "data": data}


def tx(*actions: dict[str, Any], **args: Any) -> Step:
    return ("transaction", {"actions": list(actions), **args})


def file(path: str, **kw: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": f"@D/{path}", **kw}


def blockdev(driver: str, name: str | None, child: Any, **kw: Any) -> Step:
    opts = {"driver": driver, **({"node-name": name} if name else {}), "file": child, **kw}
    return ("blockdev-add", opts)


QNBN: Step = ("query-named-block-nodes", None)
QNBN_FLAT: Step = ("query-named-block-nodes", {"flat": True})

NODES: list[Step] = [
    blockdev("qcow2", "n0", file("a.qcow2")),  # inline file child: an auto-named node
    ("blockdev-add", file("b.qcow2", **{"node-name": "f1"})),
    blockdev("qcow2", "n1", "f1"),  # the file child by node name
    ("blockdev-add", file("r.raw", **{"node-name": "fr"})),
    blockdev("raw", "r0", "fr"),
    blockdev("qcow2", "n2", file("c.qcow2", **{"node-name": "f2"})),  # in-use bitmaps
    blockdev("qcow2", "ro", file("d.qcow2"), **{"read-only": True}),
    # (the children say their cache mode too: we do not pass it down, see DIFFERENCES)
    blockdev("qcow2", "nu", file("e.qcow2", cache={"direct": True}), discard="unmap",
             cache={"direct": True}),
    blockdev("qcow2", "fs", file("d.qcow2"), **{"read-only": True, "force-share": True}),
    blockdev("raw", "ar", file("r.raw", **{"read-only": True, "cache": {"no-flush": True}}),
             **{"auto-read-only": True, "read-only": True, "cache": {"no-flush": True}}),
    QNBN, QNBN_FLAT, ("query-block", None),
    # blockdev-add refused
    ("blockdev-add", {}),
    ("blockdev-add", {"driver": "nope", "node-name": "x"}),
    ("blockdev-add", file("r.raw", **{"node-name": "9x"})),
    ("blockdev-add", file("r.raw", **{"node-name": "#x"})),
    ("blockdev-add", file("r.raw")),
    ("blockdev-add", file("r.raw", **{"node-name": "n0"})),
    blockdev("qcow2", "x", file("b.qcow2", **{"node-name": "n0"})),
    blockdev("qcow2", "x", "nx"),
    blockdev("qcow2", "x", file("nonexistent")),
    ("blockdev-add", file("nonexistent", **{"node-name": "x", "read-only": True})),
    ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "@D"}),
    blockdev("qcow2", "x", file("r.raw")),  # not a qcow2 image
    blockdev("qcow2", "x", file("e.qcow2"), **{"force-share": True}),  # not read-only
]

BITMAPS: list[Step] = [
    add("n0", "b0"),
    add("n0", "p0", persistent=True, granularity=4096),
    add("n0", "b1", granularity=512),
    add("n0", "d0", persistent=True, disabled=True, granularity=1 << 20),
    add("n0", "big", granularity=1 << 31),
    add("r0", "rb", granularity=4096),
    add("n0", "b0"),  # duplicate
    add("n1", "pb0"),  # duplicate of a stored bitmap
    add("n0", "x", granularity=1000),
    add("n0", "x", granularity=256),
    add("n0", "x", granularity=0),
    add("n0", "x", granularity=1 << 32),
    add("n0", "x", granularity=-1),
    add("nx", "x"),
    add("n0", ""),
    add("n0", "y" * 1100, persistent=True),
    add("nu", "z" * 1023, persistent=True),  # the longest name qcow2 stores
    add("nu", "z" * 1024, persistent=True),
    add("nu", "g31", persistent=True, granularity=1 << 31),
    add("nu", "u0", granularity=4096),
    add("fs", "t0", disabled=True),
    bm("remove", "n0", "big"),
    bm("remove", "n0", "zz"),
    bm("remove", "nx", "zz"),
    bm("clear", "n0", "zz"),
    bm("enable", "nx", "zz"),
    bm("disable", "n0", "zz"),
    # stored bitmaps: clear, enable, disable, merge across nodes
    bm("clear", "n1", "pb0"),
    bm("enable", "n1", "pb2"),
    bm("disable", "n1", "pb1"),
    bm("enable", "n1", "pb0"),  # already enabled
    merge("n1", "pb2", "pb1", {"node": "n0", "name": "b0"}),
    merge("n1", "pb1", "nope"),
    merge("n1", "nope", "pb0"),
    merge("n1", "pb1", {"node": "nx", "name": "b0"}),
    merge("nx", "pb1", "pb0"),
    # inconsistent (in-use at open): only remove works
    bm("clear", "n2", "iu0"),
    bm("enable", "n2", "iu0"),
    bm("disable", "n2", "iu0"),
    merge("n2", "iu0", "iu1"),
    merge("n0", "b0", {"node": "n2", "name": "iu0"}),
    add("n2", "iu0"),
    bm("remove", "n2", "iu1"),
    # read-only node: its stored bitmaps are readonly; transient ones work
    bm("clear", "ro", "pb0"),
    bm("enable", "ro", "pb2"),
    bm("disable", "ro", "pb1"),
    add("ro", "t0"),
    merge("ro", "pb0", "pb1"),
    merge("ro", "t0", "pb1"),
    merge("n0", "b0", {"node": "ro", "name": "pb1"}),
    bm("remove", "ro", "pb0"),
    QNBN_FLAT,
]

WRITES: list[Step] = [
    io("n0", "write 0 64k"),
    io("n0", "write -z 1M 300k"),  # a partial cluster too
    io("n0", "discard 4M 1M"),  # discard=ignore (QEMU's default): nothing happens
    io("n0", "write -P 0x11 10000 3000"),
    io("n0", "read -P 0x11 10000 3000"),
    io("n0", "read -P 0x12 10000 3000"),  # pattern mismatch
    io("n0", "write 100M 1"),  # past the end
    io("n0", "length"),
    io("n1", "write -P 0x22 8M 192k"),
    io("n1", "write -z 20M 64k"),
    io("n2", "write 0 4k"),  # inconsistent bitmaps do not record
    io("r0", "write 12345 7"),
    io("r0", "discard 0 1M"),
    io("r0", "write -z 2M 1M"),
    io("ro", "read 0 4k"),
    io("nu", "write -P 0x44 0 1M"),
    bm("clear", "nu", "u0"),
    io("nu", "discard 0 128k"),  # discard=unmap: recorded
    io("nu", "write -z -u 512k 128k"),
    io("nu", "read -P 0 0 128k"),
    io("nx", "write 0 1"),
    hmp("foo"),
    hmp(""),
    QNBN_FLAT,
]

TRANSACTIONS: list[Step] = [
    # fails at its last action: nothing of it stays
    tx(act("add", node="n0", name="t0"), act("clear", node="n0", name="b0"),
       act("disable", node="n1", name="pb0"), act("clear", node="n0", name="nope")),
    tx(act("add", node="n0", name="t0"), act("add", node="n0", name="t0")),
    tx(act("remove", node="n0", name="b1"), act("remove", node="n0", name="b1")),
    tx(act("clear", node="ro", name="t0"), act("clear", node="ro", name="pb0")),
    tx(act("add", node="n0", name="t0", granularity=100)),
    tx(act("merge", node="n0", target="b0", bitmaps=["p0", "zz"])),
    QNBN_FLAT,
    # six actions on three nodes, all done
    tx(act("add", node="n0", name="t0", granularity=4096),
       act("merge", node="n0", target="t0", bitmaps=["b0", "b1", {"node": "n1",
                                                                  "name": "pb1"}]),
       act("disable", node="n0", name="t0"),
       act("enable", node="n0", name="d0"),
       act("clear", node="n0", name="b1"),
       act("remove", node="r0", name="rb")),
    tx(),
    tx(act("add", node="n0", name="q0"), properties={"completion-mode": "individual"}),
    tx(act("add", node="n0", name="q1"), properties={"completion-mode": "bad"}),
    tx(act("add", node="n0", name="q1"), properties={}),
    ("transaction", {"actions": "x"}),
    ("transaction", {"actions": ["x"]}),
    ("transaction", {}),
    ("transaction", {"actions": [{"type": "bogus", "data": {}}]}),
    tx(act("add", node="nu", name="tt"), act("remove", node="nu", name="tt")),
    tx(act("add", node="nu", name="tt"), act("clear", node="nu", name="tt"),
       act("merge", node="nu", target="tt", bitmaps=["u0"])),
    tx(act("remove", node="nu", name="tt"), act("add", node="nu", name="tt")),
    tx(act("disable", node="nu", name="u0"), act("disable", node="nu", name="u0"),
       act("enable", node="nu", name="u0")),
    tx(act("merge", node="nu", target="tt", bitmaps=["tt"])),
    merge("nu", "u0", "u0", "u0", "tt"),
    io("n0", "write 30M 1M"),  # recorded by the new, enabled d0 and not by t0 (disabled)
    QNBN_FLAT,
]

ARGUMENTS: list[Step] = [
    ("nope", None),
    ("nope", {"a": 1}),
    ("query-version", {"a": 1}),
    ("query-named-block-nodes", {"flat": 1}),
    ("query-named-block-nodes", {"flat": "yes"}),
    ("query-block", {"x": None}),
    ("block-dirty-bitmap-add", {}),
    ("block-dirty-bitmap-add", {"node": "n0"}),
    ("block-dirty-bitmap-add", {"name": "x"}),
    ("block-dirty-bitmap-add", {"node": 1, "name": "x"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": None}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x", "persistent": "true"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x", "granularity": 65536.0}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x", "granularity": "64k"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x", "bogus": 1}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x", "disabled": None}),
    ("block-dirty-bitmap-remove", {"node": "n0"}),
    ("block-dirty-bitmap-remove", {"node": "n0", "name": "x", "persistent": True}),
    ("block-dirty-bitmap-clear", {"node": ["n0"], "name": "x"}),
    ("block-dirty-bitmap-enable", {"node": "n0", "name": {}}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x"}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x", "bitmaps": "a"}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x", "bitmaps": [1]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x", "bitmaps": [None]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x", "bitmaps": [{"node": "n0"}]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x",
                                  "bitmaps": [{"node": "n0", "name": "a", "z": 1}]}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "n0"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "n0", "name": "zz"}),
    ("blockdev-del", {}),
    ("blockdev-del", {"node-name": 5}),
    ("human-monitor-command", {}),
    ("human-monitor-command", {"command-line": 5}),
    ("human-monitor-command", {"command-line": "x", "cpu-index": "0"}),
]

DELETES: list[Step] = [
    ("blockdev-del", {"node-name": "f2"}),  # an inline child: not the monitor's
    ("blockdev-del", {"node-name": "f1"}),  # under n1
    ("blockdev-del", {"node-name": "fr"}),  # under r0
    ("blockdev-del", {"node-name": "nx"}),
    ("blockdev-del", {"node-name": "n2"}),  # its inline child goes with it
    ("blockdev-del", {"node-name": "f2"}),
    ("blockdev-del", {"node-name": "n1"}),  # stores pb0..pb2
    ("blockdev-del", {"node-name": "f1"}),
    ("blockdev-del", {"node-name": "f1"}),
    ("blockdev-del", {"node-name": "r0"}),  # its transient bitmaps are gone with it
    blockdev("qcow2", "n1", file("b.qcow2")),  # the stored bitmaps again
    add("n1", "after", granularity=1 << 20),
    io("n1", "write 40M 64k"),
    QNBN, QNBN_FLAT,
]

SCRIPT: list[Step] = [*NODES, *BITMAPS, *WRITES, *TRANSACTIONS, *ARGUMENTS, *DELETES]


# ------------------------------------------------------------------------ the images after
def _info(path: Path) -> dict[str, Any]:
    """``qemu-img info``, but for the host's allocation and the order of the bitmap directory
    (QEMU appends the bitmaps new in a session at close, newest first; we store each one when
    it is added: the same bitmaps, listed in another order)."""
    info = json.loads(peers.qemu_img("info", "--output=json", path).stdout)
    for key in ("actual-size", "filename"):
        info.pop(key, None)
    data = info.get("format-specific", {}).get("data", {})
    if "bitmaps" in data:
        data["bitmaps"].sort(key=lambda b: b["name"])
    return dict(info)


def _check(path: Path) -> dict[str, Any]:
    proc = peers.qemu_img("check", "--output=json", path, ok=None)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, f"qemu-img check {path}: {proc.stdout}{proc.stderr}"
    return {k: report.get(k, 0) for k in ("check-errors", "corruptions", "leaks")}


def image_differences(qd: Path, od: Path) -> Iterator[str]:
    """Both copies of each image after both servers quit: info, check, data, dirty extents."""
    for name in sorted(p.name for p in qd.iterdir()):
        q, o = qd / name, od / name
        qi, oi = _info(q), _info(o)
        if qi != oi:
            yield f"{name}: qemu-img info:\n  QEMU: {_show(qi)}\n  ours: {_show(oi)}"
        fmt = qi["format"]
        if fmt == "qcow2" and _check(q) != _check(o):
            yield f"{name}: qemu-img check: QEMU {_check(q)}, ours {_check(o)}"
        cmp = peers.qemu_img("compare", "-f", fmt, "-F", fmt, q, o, ok=None)
        if cmp.returncode != 0:
            yield f"{name}: qemu-img compare: {cmp.stdout.strip()} {cmp.stderr.strip()}"
        for b in qi.get("format-specific", {}).get("data", {}).get("bitmaps", []):
            if "in-use" in b["flags"]:
                continue  # qemu-nbd refuses to export an inconsistent bitmap
            qr, orr = peers.nbd_dirty_runs(q, b["name"]), peers.nbd_dirty_runs(o, b["name"])
            if qr != orr:
                yield f"{name}: dirty extents of {b['name']}:\n  QEMU: {qr}\n  ours: {orr}"


# ------------------------------------------------------------------------ the tests
@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_same_script_same_replies_same_images(images: Path, tmp_path: Path) -> None:
    qemu, ours, qd, od = await both(images, tmp_path, SCRIPT)
    diffs = differences(SCRIPT, qemu, ours)
    assert not diffs, report(diffs)
    # the script did what it meant to: these are not all errors
    assert qemu.status == 0
    assert sum(r[0] == "return" for r in qemu.replies) > 60
    assert sum(r[0] == "error" for r in qemu.replies) > 80
    assert "wrote 65536/65536 bytes at offset 0" in ours.stdout
    assert len(qemu.sha256) >= 10 and len(set(qemu.sha256.values())) > 4
    # and the images on disk agree, bitmaps included
    diffs = list(image_differences(qd, od))
    assert not diffs, "\n".join(diffs)
    stored = {b["name"]: b for b in peers.qemu_bitmaps(od / "a.qcow2")}
    assert set(stored) == {"p0", "d0"}
    assert stored["d0"]["flags"] == ["auto"]  # enabled by the transaction
    assert [b["name"] for b in peers.qemu_bitmaps(od / "c.qcow2")] == ["iu0"]
    assert peers.nbd_dirty_runs(od / "a.qcow2", "d0") == [(30 * MiB, MiB)]


def unix(path: str) -> dict[str, Any]:
    return {"type": "unix", "data": {"path": path}}


def export(eid: str, node: str, **kw: Any) -> Step:
    return ("block-export-add", {"type": "nbd", "id": eid, "node-name": node,
                                 **{k.replace("_", "-"): v for k, v in kw.items()}})


QBE: Step = ("query-block-exports", None)

#: The NBD server's commands (issue 14): exports, their bitmaps busy, QEMU's texts.
NBD_SCRIPT: list[Step] = [
    blockdev("qcow2", "n0", file("a.qcow2")),
    blockdev("qcow2", "n1", file("b.qcow2")),
    blockdev("qcow2", "ro", file("d.qcow2"), **{"read-only": True}),
    add("n0", "b0"),
    export("e0", "n0"),  # no server yet
    ("nbd-server-stop", None),
    ("nbd-server-start", {"addr": unix("@D/nbd.sock")}),
    ("nbd-server-start", {"addr": unix("@D/nbd2.sock")}),  # already running
    export("e0", "nope"),
    export("e0", "n0", bitmaps=["b0"]),  # enabled bitmap, read-only export
    export("e0", "n0", bitmaps=["zz"]),
    bm("disable", "n0", "b0"),
    export("e0", "n0", bitmaps=["b0"], description="the first"),
    export("e0", "n1"),  # id in use
    export("e1", "n1", name="n0"),  # name in use
    export("e1", "n1", name="b", bitmaps=["pb0"], writable=True, allocation_depth=True),
    export("e2", "ro", writable=True),  # read-only node
    export("e2", "ro", bitmaps=["pb2"]),
    QBE,
    bm("clear", "n0", "b0"),  # busy: exported
    bm("enable", "n0", "b0"),
    bm("remove", "n0", "b0"),
    merge("n0", "b0", "b0"),
    bm("clear", "n1", "pb0"),  # busy, though writable
    ("blockdev-del", {"node-name": "n0"}),  # in use by the export
    ("block-export-del", {"id": "nope"}),
    ("block-export-del", {"id": "e0", "mode": "bogus"}),
    ("block-export-del", {"id": "e0"}),
    bm("clear", "n0", "b0"),  # free again
    ("block-export-del", {"id": "e2", "mode": "hard"}),
    ("nbd-server-add", {"device": "n0", "name": "legacy", "bitmap": "b0"}),
    ("nbd-server-add", {"device": "nope"}),
    ("nbd-server-add", {"device": "ro", "writable": True}),  # downgraded to read-only
    QBE,
    ("nbd-server-remove", {"name": "nope"}),
    ("nbd-server-remove", {"name": "legacy"}),
    ("nbd-server-remove", {"name": "ro", "mode": "hard"}),
    ("nbd-server-stop", None),
    QBE,
    ("nbd-server-stop", None),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                              "port": "0"}}}),
    export("e3", "n1"),
    ("nbd-server-stop", None),
    QBE,
]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_nbd_server_commands_same_replies(images: Path, tmp_path: Path) -> None:
    qemu, ours, _, _ = await both(images, tmp_path, NBD_SCRIPT)
    diffs = differences(NBD_SCRIPT, qemu, ours)
    assert not diffs, report(diffs)
    assert sum(r[0] == "return" for r in qemu.replies) > 15
    assert sum(r[0] == "error" for r in qemu.replies) > 15


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_version_and_commands(tmp_path: Path) -> None:
    """query-version has QEMU's shape and release; every command we list (but our own
    additions) is one of QEMU's, and the monitor knows the commands the tests drive."""
    lists: dict[str, set[str]] = {}
    for name, server in (("qemu", peers.qmp.qemu_system), ("ours", peers.qmp.dirtybits_serve)):
        async with server() as vm:
            version = await vm.execute("query-version")
            assert set(version) == {"qemu", "package"}
            assert set(version["qemu"]) == {"major", "minor", "micro"}
            assert (version["qemu"]["major"], version["qemu"]["minor"]) == (7, 2)
            lists[name] = {c["name"] for c in await vm.execute("query-commands")}
    assert lists["ours"] - EXTENSIONS <= lists["qemu"], lists["ours"] - lists["qemu"]
    assert lists["ours"] >= EXTENSIONS
    used = {step[0] for step in SCRIPT} - {"nope"}
    assert used <= lists["ours"] and used <= lists["qemu"]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_merge_of_no_bitmaps_is_an_error_here(images: Path, tmp_path: Path) -> None:
    """``block-dirty-bitmap-merge`` with an empty ``bitmaps`` list aborts QEMU 7.2 (an
    assertion in the merge), so it is not in the shared script: we refuse it, in a
    transaction too, and change nothing."""
    d = side(images, tmp_path / "ours")
    async with peers.qmp.dirtybits_serve() as vm:
        await vm.execute("blockdev-add", _args(blockdev("qcow2", "n1", file("b.qcow2"))[1], d))
        before = await vm.execute("x-debug-block-dirty-bitmap-sha256",
                                  {"node": "n1", "name": "pb0"})
        with pytest.raises(ExecuteError) as ei:
            await vm.execute("block-dirty-bitmap-merge",
                             {"node": "n1", "target": "pb0", "bitmaps": []})
        assert ei.value.error_class == "GenericError"
        assert "'bitmaps' is empty" in ei.value.error.error.desc
        with pytest.raises(ExecuteError):
            await vm.execute("transaction", {"actions": [
                act("clear", node="n1", name="pb0"),
                act("merge", node="n1", target="pb1", bitmaps=[])]})
        assert await vm.execute("x-debug-block-dirty-bitmap-sha256",
                                {"node": "n1", "name": "pb0"}) == before
        assert await vm.quit() == 0


#: Where dirtybits differs from QEMU on purpose (its graph stacks one format node on one file
#: node; it will not accept a persistent bitmap it could never store): step, our reply (an
#: error class and text), what QEMU does instead (in the comment).
DOCUMENTED: list[tuple[list[Step], tuple[str, str]]] = [
    # QEMU: {} (and at close: "Lost persistent bitmaps during inactivation of node 'ro'")
    ([blockdev("qcow2", "ro", file("d.qcow2"), **{"read-only": True}),
      add("ro", "t1", persistent=True)],
     ("GenericError", "Can't make bitmap 't1' persistent in 'ro': the node is read-only "
                      "(QEMU would lose it at close)")),
    # QEMU: {} (a bitmap on the protocol node)
    ([("blockdev-add", file("r.raw", **{"node-name": "fr"})), blockdev("raw", "r0", "fr"),
      add("fr", "t1")],
     ("GenericError", "Node 'fr' is the protocol node under 'r0': dirtybits keeps bitmaps and "
                      "takes I/O on the format node; use 'r0'")),
    # QEMU: {} (raw over qcow2)
    ([blockdev("qcow2", "n0", file("a.qcow2")), blockdev("raw", "x", "n0")],
     ("GenericError", "the 'file' child of 'x' must be a 'file' node, not 'qcow2' (dirtybits "
                      "stacks formats on files only)")),
    # QEMU: {} (two raw nodes on one read-only file node)
    ([("blockdev-add", file("r.raw", **{"node-name": "fr", "read-only": True})),
      blockdev("raw", "r0", "fr"), blockdev("raw", "r1", "fr")],
     ("GenericError", "Node 'fr' is already the file of 'r0': two format nodes cannot share "
                      "one file")),
    # QEMU: {} (zero writes detected and turned into write-zeroes)
    ([blockdev("raw", "r0", file("r.raw"), **{"detect-zeroes": "on"})],
     ("GenericError", "detect-zeroes=on is not supported by dirtybits (only off)")),
    # QEMU: {} (a raw window into the file)
    ([blockdev("raw", "r0", file("r.raw"), offset=512)],
     ("GenericError", "raw 'offset' is not supported by dirtybits")),
]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_documented_divergences(images: Path, tmp_path: Path) -> None:
    d = side(images, tmp_path / "ours")
    for steps, (cls, desc) in DOCUMENTED:
        async with peers.qmp.dirtybits_serve() as vm:
            for cmd, args in steps[:-1]:
                await vm.execute(cmd, _args(args, d))
            with pytest.raises(ExecuteError) as ei:
                await vm.execute(steps[-1][0], _args(steps[-1][1], d))
            assert (ei.value.error_class, ei.value.error.error.desc) == (cls, desc)
            assert await vm.quit() == 0


@dataclass(frozen=True)
class Bug:
    steps: list[Step]
    differ: frozenset[Key]  # what differs while the bug is there: step indexes, "stdout", ...
    exact: bool = False  # compare without the normalizations that hide it


def _case(id: str, steps: list[Step], differ: set[Key], reason: str, *,
          exact: bool = False) -> Any:
    return pytest.param(Bug(steps, frozenset(differ), exact), id=id,
                        marks=pytest.mark.xfail(strict=True, raises=Differs, reason=reason))


def _fixed(id: str, steps: list[Step], differ: set[Key], reason: str, *,
           exact: bool = False) -> Any:
    """A difference found and fixed: the script must now get QEMU's replies exactly."""
    del differ, reason
    return pytest.param(Bug(steps, frozenset(), exact), id=id)


N0 = blockdev("qcow2", "n0", file("a.qcow2"))

#: Bugs: where the daemon answers differently from QEMU 7.2 and should not (each checked in
#: QEMU's source, and not a normalization). Each is a short script run against both; its
#: xfail holds while exactly the steps named differ (another difference fails the test), and
#: turns into a failure (strict) once the bug is fixed: then drop the case's mark.
DIFFERENCES = [
    _fixed("node-order", [N0, ("blockdev-add", file("b.qcow2", **{"node-name": "f1"})),
                         blockdev("qcow2", "n1", "f1"), QNBN], {3},
          "query-named-block-nodes: QEMU lists the newest node first (bdrv_named_nodes_list "
          "prepends), an inline child after its parent: [n1, f1, n0, #block]; we list the "
          "oldest first: [n0, #block, f1, n1]", exact=True),
    _fixed("file-virtual-size", [("blockdev-add", file("a.qcow2", **{"node-name": "f0"})),
                                QNBN], {1},
          "query-named-block-nodes: a file node's image.virtual-size is the file's length "
          "rounded up to 512 in QEMU (bdrv_getlength counts sectors): 197120 for a.qcow2 of "
          "196616 bytes; we say 196616", exact=True),
    _fixed("cache-inherited", [blockdev("qcow2", "n0", file("a.qcow2"), cache={"direct": True}),
                              blockdev("raw", "r0", file("r.raw"), cache={"no-flush": True}),
                              QNBN_FLAT], {2},
          "query-named-block-nodes: an inline file child inherits its parent's cache.direct "
          "and cache.no-flush in QEMU (bdrv_inherited_options): the #block under n0 says "
          "direct: true, the one under r0 no-flush: true; ours say false"),
    _fixed("raw-persistent-text", [blockdev("raw", "r0", file("r.raw")),
                                  add("r0", "p", persistent=True)], {1},
          "block-dirty-bitmap-add persistent=true on a raw node: QEMU: \"Can't store "
          "persistent bitmaps to r0: Operation not supported\"; ours: \"Can't make bitmap "
          "'p' persistent in 'r0': Operation not supported\" (qcow2's text)"),
    _fixed("lock-hint", [N0, blockdev("qcow2", "x", file("a.qcow2"))], {1},
          "blockdev-add of an image already open: QEMU: 'Failed to get \"write\" lock' (the "
          "hint 'Is another process using the image [...]?' is not part of a QMP error); "
          "ours has the hint in desc"),
    _fixed("hmp-usage", [hmp("qemu-io"), hmp("qemu-io n0")], {0, 1},
          "HMP 'qemu-io' without a node / without a command: QEMU returns 'qemu-io: block "
          "device name expected\\r\\nTry \"help qemu-io\" for more information\\r\\n' and "
          "'qemu-io: string expected\\r\\nTry ...'; ours 'Error: qemu-io needs a node and a "
          "command: qemu-io [-d] NODE \"CMD\"\\r\\n'"),
    _fixed("hmp-qdev", [N0, hmp('qemu-io -d n0 "write 0 4k"')], {1, "stdout"},
          "HMP 'qemu-io -d NODE \"CMD\"': -d means a qdev id: QEMU returns \"Error: Device "
          "'n0' not found\\r\\n\" and writes nothing; ours ignores -d, writes and returns ''"),
    _fixed("hmp-readonly-write", [blockdev("qcow2", "ro", file("d.qcow2"), **{"read-only": True}),
                                 io("ro", "write 0 4k")], {1, "stdout"},
          "HMP qemu-io write on a read-only node: QEMU returns 'Block node is read-only\\r\\n' "
          "(error_report goes to the monitor) and prints nothing; ours returns '' and prints "
          "'qemu-io: Block node is read-only' on stdout"),
    _fixed("hmp-stderr", [N0, io("n0", "bogus"), io("n0", "write")], {"stdout"},
          "HMP qemu-io 'bogus' and 'write' (no arguments): QEMU prints 'command \"bogus\" not "
          "found' and 'bad argument count 0 to write, expected at least 2 arguments' on "
          "stderr (fprintf(stderr)); ours on stdout"),
    _fixed("hmp-info", [N0, io("n0", "info")], {1, "stdout"},
          "HMP qemu-io 'info': QEMU returns the 'Format specific information' lines (compat: "
          "1.1 ...) as the HMP reply (qemu_printf in monitor context) and prints the rest on "
          "stdout; ours returns '' and prints all on stdout"),
    _case("hmp-help", [N0, io("n0", "help write")], {"stdout"},
          "HMP qemu-io 'help write': QEMU prints the command's long help (' writes a range of "
          "bytes...', the options) after its usage line; ours prints the usage line only"),
    _fixed("hmp-io-commands", [N0, io("n0", "open x"), io("n0", "aio_flush")], {"stdout"},
          "HMP qemu-io 'open x': QEMU prints 'command \"open\" not found' (on stderr: HMP "
          "qemu-io has no open); ours 'command \"open\" is not supported by dirtybits io' on "
          "stdout; 'aio_flush': QEMU prints nothing, ours that it is not supported"),
    _fixed("tx-abort", [N0, tx({"type": "abort", "data": {}}),
                       tx(act("add", node="n0", name="a"), {"type": "abort", "data": {}})],
          {1, 2}, "transaction with an 'abort' action: QEMU: 'Transaction aborted using Abort "
          "action'; ours: \"Parameter 'type' does not accept value 'abort'\""),
    _fixed("tx-argument-paths", [
        N0, ("transaction", {"actions": [{"data": {}}]}),
        ("transaction", {"actions": [{"type": "block-dirty-bitmap-add"}]}),
        tx({"type": "block-dirty-bitmap-add", "data": {"node": "n0"}}),
        tx({"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "q", "x": 1}}),
        tx({"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "q"}, "x": 1}),
        tx(act("add", node="n0", name="q"), properties={"x": 1})], {1, 2, 3, 4, 5, 6},
        "transaction argument errors name the member's path in QEMU: \"Parameter "
        "'actions[0].type' is missing\", 'actions[0].data' is missing, 'actions[0].data.name' "
        "is missing, 'actions[0].data.x' / 'actions[0].x' / 'properties.x' is unexpected; "
        "ours say 'type', 'data', 'name', 'x', 'x', 'x'"),
    _fixed("tx-grouped", [N0, tx(act("add", node="n0", name="q"),
                                properties={"completion-mode": "grouped"}), QNBN_FLAT],
          {1, 2, "sha256"},
          "transaction with completion-mode=grouped: QEMU: \"Action 'block-dirty-bitmap-add' "
          "does not support Transaction property completion-mode = grouped\"; ours accepts "
          "it and adds the bitmap"),
    _fixed("blockdev-add-crashes", [
        ("blockdev-add", {"driver": "file", "node-name": "x1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x2"}),
        blockdev("qcow2", "x3", 5),
        blockdev("qcow2", "x4", {"driver": "file"}),
        blockdev("qcow2", "x5", {"filename": "@D/a.qcow2"}),
        ("blockdev-add", {"driver": "file", "node-name": "x6", "filename": 5})],
        {0, 1, 2, 3, 4, 5},
        "blockdev-add with members missing or mistyped: QEMU: \"Parameter 'filename' is "
        "missing\", \"Parameter 'file' is missing\", \"Invalid parameter type for 'file', "
        "expected: BlockdevRef\", \"Parameter 'file.filename' is missing\", \"Parameter "
        "'file.driver' is missing\", \"Invalid parameter type for 'filename', expected: "
        "string\"; ours: 'internal error in blockdev-add: KeyError: ...' / 'TypeError: ...'"),
    _fixed("blockdev-add-schema", [
        ("blockdev-add", {"driver": 5, "node-name": "x"}),
        ("blockdev-add", file("r.raw", **{"node-name": "x1", "bogus": 1})),
        ("blockdev-add", file("r.raw", **{"node-name": "x2", "read-only": "on"})),
        ("blockdev-add", file("r.raw", **{"node-name": "a" * 40}))], {0, 1, 2, 3},
        "blockdev-add: QEMU: \"Invalid parameter type for 'driver', expected: string\", "
        "\"Parameter 'bogus' is unexpected\", \"Invalid parameter type for 'read-only', "
        "expected: boolean\", 'Node name too long' (over 31 characters); ours: \"Parameter "
        "'driver' does not accept value '5'\", {} (bogus ignored), {} (read-only 'on' taken), "
        "\"Invalid node-name: 'aaa...'\""),
]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("bug", DIFFERENCES)
async def test_differs_from_qemu(bug: Bug, images: Path, tmp_path: Path) -> None:
    qemu, ours, _, _ = await both(images, tmp_path, bug.steps, exact=bug.exact)
    diffs = differences(bug.steps, qemu, ours)
    if not bug.differ:  # fixed: no difference at all
        assert not diffs, report(diffs)
    if diffs:
        # another difference than the bug's is a failure of its own, not the expected one
        assert set(diffs) == bug.differ, report(diffs)
        raise Differs(report(diffs))


# ------------------------------------------------------------------------ qmp-shell
def _shell(sock: Path, commands: list[str], *options: str) -> list[Any]:
    """Feed ``commands`` to ``qmp-shell OPTIONS SOCK`` on stdin; its replies, parsed."""
    proc = peers.sh(QMP_SHELL, *options, sock, input="".join(c + "\n" for c in commands),
                    timeout=30)
    # after the banner, one reply per prompt ("(QEMU) "; "TRANS> " inside a transaction)
    out = [re.sub(r"^(TRANS> )+", "", r) for r in proc.stdout.split("(QEMU) ")[1:]]
    return [json.loads(r) if r.startswith(("{", "[")) else r.strip() for r in out]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.skipif(not QMP_SHELL.exists(), reason=f"{QMP_SHELL} not installed")
async def test_qmp_shell_drives_the_daemon(images: Path, tmp_path: Path) -> None:
    d = side(images, tmp_path / "ours")
    async with peers.qmp.dirtybits_serve(
            "--blockdev", json.dumps(_args(blockdev("qcow2", "n0", file("a.qcow2"))[1], d))
    ) as vm:
        replies = await asyncio.to_thread(_shell, vm.sock, [
            "query-version",
            "block-dirty-bitmap-add node=n0 name=b0 granularity=4096",
            "block-dirty-bitmap-add node=n0 name=b0",
            "block-dirty-bitmap-add node=n0",
            "nope",
            "transaction(",
            "block-dirty-bitmap-add node=n0 name=b1 persistent=true",
            "block-dirty-bitmap-clear node=n0 name=b0",
            ")",
            "query-named-block-nodes flat=true",
        ])
        assert replies[0]["return"]["qemu"]["major"] == 7
        assert replies[1] == {"return": {}}
        assert replies[2] == {"error": {"class": "GenericError",
                                        "desc": "Bitmap already exists: b0"}}
        assert replies[3]["error"]["desc"] == "Parameter 'name' is missing"
        assert replies[4]["error"] == {"class": "CommandNotFound",
                                       "desc": "The command nope has not been found"}
        assert replies[5] == {"return": {}}  # the transaction
        assert replies[7:] == [""]  # the last prompt, then end of input
        (node,) = [n for n in replies[6]["return"] if n["node-name"] == "n0"]
        assert [(b["name"], b["granularity"], b["persistent"]) for b in node["dirty-bitmaps"]] \
            == [("b1", 65536, True), ("b0", 4096, False)]
        # -H: each line is an HMP command line (human-monitor-command)
        hmp_replies = await asyncio.to_thread(_shell, vm.sock, [
            'qemu-io n0 "write 0 64k"', "foo"], "-H")
        assert hmp_replies[0].strip() == ""
        assert hmp_replies[1].strip() == "unknown command: 'foo'"
        sha = await vm.execute("x-debug-block-dirty-bitmap-sha256", {"node": "n0", "name": "b1"})
        assert await vm.quit() == 0
        assert "wrote 65536/65536 bytes at offset 0" in vm.stdout
    # the same bits as QEMU records for that write
    async with peers.qmp.qemu_system() as vm:
        await vm.execute("blockdev-add", _args(blockdev("qcow2", "n0", file("a.qcow2"))[1],
                                                side(images, tmp_path / "qemu")))
        await vm.execute("block-dirty-bitmap-add", {"node": "n0", "name": "b1"})
        await vm.execute("human-monitor-command", {"command-line": 'qemu-io n0 "write 0 64k"'})
        assert await vm.execute("x-debug-block-dirty-bitmap-sha256",
                                {"node": "n0", "name": "b1"}) == sha
        await vm.quit()
