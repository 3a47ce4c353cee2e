"""``--blockdev`` and ``blockdev-add`` arguments against QEMU 7.2 itself.

Bad arguments: ``qemu-storage-daemon --blockdev ARG`` exits at once with ``qemu-storage-daemon:
--blockdev ARG: TEXT``; ``parse_blockdev(ARG)`` must raise ``QmpError(TEXT)``. The JSON ones
(and some objects of their own) go through ``blockdev-add`` on ``qemu-system-x86_64 -M none``
as well, against ``blockdev_options``.

Good arguments, on real files: ``parse_blockdev`` accepts them, and so does QEMU, shown by a
daemon that opens them and then stops at a sentinel ``--blockdev`` it refuses (a daemon that
accepted everything would keep running); through QMP, ``blockdev-add`` of what
``parse_blockdev`` made of them (the keyval ones converted to typed JSON by us) succeeds.

Deliberate differences (drivers and members dirtybits does not serve) are listed apart, with
what each side says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

import peers
from dirtybits.proto.keyval import from_json, parse_blockdev
from dirtybits.proto.qmp.blockdev import blockdev_options
from dirtybits.proto.qmp.core import QmpError
from peers import qmp

pytestmark = pytest.mark.interop

SENTINEL = "driver=zz-sentinel"
SENTINEL_TEXT = "Parameter 'driver' does not accept value 'zz-sentinel'"

BAD = [
    # keyval syntax
    "driver=file,=1", "driver=file,x", "driver=file,x.=1", "driver=file,1=x", "fi,,le",
    "driver=file,_x=1", "driver=file,a.1b=x", "driver=file,a.b=1,a=2", "driver=file,a=2,a.b=1",
    "driver=file,a.0=1,a.b=1", "driver=file,a.b.0=1,a.b.c=2", "driver=file,a.1=1",
    "driver=file,a.5=x", "z.0=1,z.x=2,a.0=1,a.x=2", "driver=file," + "a" * 128 + "=1",
    "driver=file,x." + "a" * 128 + "=1", "help", "?", "x,help", "help,x",
    "driver=file,help,filename=/x",
    # keyval values
    "", "driver=bogus", "file", "driver=file,filename=/x,bogus=1",
    "driver=file,filename=/x", "driver=raw,file=", "driver=qcow2,file=x,backing=",
    "driver=file,filename=/x,node-name=n,read-only=1",
    "driver=file,filename=/x,node-name=n,read-only=ON",
    "driver=file,filename=/x,node-name=n,read-only=",
    "driver=file,filename=/x,aio-max-batch=x",
    "driver=file,filename=/x,aio-max-batch=99999999999999999999",
    "driver=file,filename=/x,locking=maybe", "driver=file,filename=/x,aio=posix",
    "driver=raw,file=x,size=1k", "driver=raw,file=x,node-name=n,size=0x",
    "driver=raw,file=x,node-name=n,size=08", "driver=raw,file=x,node-name=n,size=5 ",
    "driver=raw,file=x,node-name=n,size=-9223372036854775809",
    "driver=raw,file=x,size=9223372036854775808,node-name=n",
    "driver=file,cache=x", "driver=file,cache.direct=x", "driver=file,cache.bogus=x",
    "driver=file,filename.x=1", "driver=file,filename=x,aio.0=1",
    "driver=file,node-name.a=1,filename=x", "driver=raw,file.driver=bogus",
    "driver=raw,file.driver=file", "driver=raw,file.0=x",
    "driver=qcow2,file=x,backing.driver=raw", "driver=raw,file=x,a=1,b=2,c=3",
    "driver=qcow2,file=x,node-name=n,overlap-check=bogus",
    "driver=qcow2,file=x,node-name=n,overlap-check.template=bogus",
    "driver=qcow2,file=x,node-name=n,overlap-check.main-header=x",
    "driver=qcow2,file=x,node-name=n,discard=x", "driver=raw,file=x,detect-zeroes=off,x=1",
    # JSON syntax
    "{", '{"driver":"file"', "{]", '{"a":1} x', '{"driver":"file",}', '{"driver":"file"}}',
    "{} {}", '{"a":1}]', '{"a":tRue}', '{"a":"file', "{X}", '{"a":01}', '{"a":1.}',
    '{"a":-}', '{"a":1e}', '{"a":+1}', '{"a":NaN}', '{"a":%d}', '{"a":"\t"}', '{"a":"\\q"}',
    '{"a":"\\u12"}', '{"a":"\\ud800"}', '{"a":"\\ud83d\\u0041"}', '{"a":"\\uffff"}',
    '{"a":"\uffff"}', "{1:2}", "{null:2}", '{{"a" 1}:2}', '{"a" 1}', '{"a":1 "b":2}',
    '{"a":[1 2]}', '{"a":[1,]}', '{"a":tru}', '{"driver":"file","driver":"raw"}',
    '{"a":' + "[" * 1024 + "]" * 1024 + "}", '{"a":é}',
    # JSON values
    '{"a":' + "[" * 1023 + "]" * 1023 + "}", "{ }", '{"driver":1}',
    '{"driver":"file","filename":1}', "{'driver':'file'}", '{"driver":"raw","file":1}',
    '{"driver":"raw","file":null}', '{"driver":"raw","file":{"driver":"raw","file":1}}',
    '{"driver":"qcow2","file":"x","backing":1}', '{"driver":"qcow2","file":"x","backing":[]}',
    '{"driver":"qcow2","file":"x","backing":{"driver":"raw","file":[]}}',
    '{"driver":"qcow2","file":"x","backing":{"driver":"raw"}}',
    '{"driver":"raw","file":{"driver":"bogus"}}', '{"driver":"raw","file":{"driver":1}}',
    '{"driver":"raw","file":{}}', '{"driver":"raw","file":{"driver":"file"}}',
    '{"driver":"file","filename":"x","aio-max-batch":1.5}',
    '{"driver":"file","filename":"x","aio-max-batch":"1"}',
    '{"driver":"file","filename":"x","aio-max-batch":18446744073709551615}',
    '{"driver":"file","filename":"x","aio-max-batch":9223372036854775808}',
    '{"driver":"file","filename":"x","aio-max-batch":1e3}',
    '{"driver":"file","filename":"x","read-only":"on"}',
    '{"driver":"file","filename":"x","node-name":1}',
    '{"driver":"raw","file":"x","cache":{"direct":true,"no-flush":false,"p":1,"q":2,"r":3}}',
    '{"driver":"raw","file":{"driver":"raw","bogus":2,"file":{"driver":"file","filename":"x",'
    '"bogus":1}}}',
    '{"driver":"raw","file":"x","k0":0,"k1":1,"k2":2,"k3":3,"k4":4,"k5":5,"k6":6,"k7":7,'
    '"k8":8,"k9":9}',
    '{"driver":"qcow2","file":"x","node-name":"n","overlap-check":1}',
    '{"driver":"qcow2","file":"x","node-name":"n","overlap-check":{"template":"bad"}}',
    '{"driver":"qcow2","file":"x","node-name":"n","overlap-check":{"template":"all","x":1}}',
]

# What only QMP can send: many unexpected members (QEMU's hash order decides which it names)
QMP_BAD: list[dict[str, Any]] = [
    {"driver": "raw", "file": "x", **{f"key{i}": i for i in range(40)}},
    {**{f"m{i}": i for i in range(25, 0, -1)}, "driver": "file", "filename": "x"},
    {"driver": "raw", "file": {"driver": "file", "filename": "x",
                               **{f"z{i}": True for i in range(12)}}},
    {"driver": "qcow2", "file": "x", "backing": None, "lazy-refcounts": 1},
    {"driver": "raw", "file": "x", "offset": -(1 << 63) - 1},
]

# Refused by dirtybits on purpose, where QEMU goes on: (argument, QEMU's text, ours)
REFUSED = [
    ("nbd", "Parameter 'server' is missing", "Parameter 'driver' does not accept value 'nbd'"),
    ("driver=vmdk", "Parameter 'file' is missing",
     "Parameter 'driver' does not accept value 'vmdk'"),
    ("driver=luks,file=x,node-name=n", "Cannot find device='x' nor node-name='x'",
     "Parameter 'driver' does not accept value 'luks'"),
    ("driver=qcow2,file=x,node-name=n,encrypt.format=luks",
     "Cannot find device='x' nor node-name='x'", "Parameter 'encrypt' is unexpected"),
    ("driver=file,filename=x,node-name=n,pr-manager=p",
     "No persistent reservation manager with id 'p'", "Parameter 'pr-manager' is unexpected"),
]

# Good: groups of --blockdev arguments opened in order ({raw}, {qcow2}, {base}: real images;
# {p}: a prefix that keeps node names apart between groups)
GOOD = [
    ["driver=file,node-name={p}f,filename={raw}"],
    ["file,node-name={p}f,filename={raw},locking=off,read-only=on,force-share=on,"
     "cache.direct=off,cache.no-flush=on,discard=ignore,detect-zeroes=on,aio=threads,"
     "aio-max-batch=0x10,drop-cache=off,x-check-cache-dropped=no,auto-read-only=yes"],
    ["driver=raw,node-name={p}r,file.driver=file,file.filename={raw},offset=512,size=0x1000"],
    ["driver=file,node-name={p}f,filename={raw}", "raw,node-name={p}r,file={p}f"],
    ["driver=qcow2,node-name={p}q,file.driver=file,file.filename={qcow2},"
     "lazy-refcounts=on,cache-size=1048576,l2-cache-entry-size=4096,refcount-cache-size=65536,"
     "cache-clean-interval=0,pass-discard-request=on,pass-discard-snapshot=off,"
     "pass-discard-other=on,overlap-check=cached,discard=unmap,detect-zeroes=unmap"],
    ["driver=qcow2,node-name={p}q,file.driver=file,file.filename={qcow2},"
     "overlap-check.template=all,overlap-check.active-l2=off,l2-cache-size=65536"],
    ["driver=file,node-name={p}b,filename={base}",
     "driver=qcow2,node-name={p}q,file.driver=file,file.filename={qcow2},backing.driver=qcow2,"
     "backing.file={p}b"],
    ['{"driver":"file","node-name":"{p}f","filename":"{raw}","read-only":true,'
     '"cache":{"direct":false}}'],
    ['{"driver":"qcow2","node-name":"{p}q","file":{"driver":"file","filename":"{qcow2}"},'
     '"backing":null,"overlap-check":"none","cache-size":0}'],
    ["{'driver':'raw','node-name':'{p}r','file':{'driver':'file','filename':'{raw}'},"
     "'size':512}"],
]


def need(binary: str) -> None:
    if qmp.missing([binary]):
        pytest.skip(f"needs {binary} (run scripts/setup to install it)")


def ours(arg: str) -> str | None:
    """Our text for ``arg`` (None: accepted), with bytes that are not UTF-8 shown as QEMU's
    output decodes them."""
    try:
        parse_blockdev(arg)
    except QmpError as exc:
        return str(exc).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None


def qemu_says(*args: str) -> str:
    """What ``qemu-storage-daemon --blockdev A --blockdev B ...`` says as it exits."""
    proc = peers.run(qmp.STORAGE_DAEMON, *[a for arg in args for a in ("--blockdev", arg)],
                     timeout=10)
    assert proc.returncode != 0, (args, proc.stderr)
    for arg in args:
        prefix = f"qemu-storage-daemon: --blockdev {arg}: "
        if proc.stderr.startswith(prefix):
            return proc.stderr[len(prefix):].removesuffix("\n")
    raise AssertionError(f"{args}: {proc.stderr!r}")


def fill(arg: str, images: dict[str, Path], prefix: str) -> str:
    for key, path in images.items():
        arg = arg.replace("{" + key + "}", str(path))
    return arg.replace("{p}", prefix)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    raw, qcow2, base = tmp_path / "a.raw", tmp_path / "a.qcow2", tmp_path / "base.qcow2"
    raw.write_bytes(bytes(1 << 20))
    peers.qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    peers.qemu_img("create", "-q", "-f", "qcow2", qcow2, "1M")
    return {"raw": raw, "qcow2": qcow2, "base": base}


@pytest.mark.timeout(120)
def test_bad_blockdev_arguments_as_qemu_storage_daemon() -> None:
    need(qmp.STORAGE_DAEMON)
    mismatches = [(arg, qemu, mine) for arg in BAD
                  if (qemu := qemu_says(arg)) != (mine := ours(arg))]
    assert not mismatches


@pytest.mark.timeout(120)
def test_deliberately_refused() -> None:
    need(qmp.STORAGE_DAEMON)
    for arg, qemu, mine in REFUSED:
        assert (qemu_says(arg), ours(arg)) == (qemu, mine)


@pytest.mark.timeout(120)
def test_good_blockdev_arguments_as_qemu_storage_daemon(images: dict[str, Path]) -> None:
    need(qmp.STORAGE_DAEMON)
    for i, group in enumerate(GOOD):
        args = [fill(arg, images, f"g{i}") for arg in group]
        for arg in args:
            assert ours(arg) is None, arg
        assert qemu_says(*args, SENTINEL) == SENTINEL_TEXT, args


def _refuse(constant: str) -> None:
    raise ValueError(constant)  # NaN and Infinity are not JSON


def _json_objects() -> list[dict[str, Any]]:
    """The bad JSON arguments that are JSON objects to a strict parser (what QMP carries)."""
    out = []
    for arg in BAD:
        try:
            obj = json.loads(arg, parse_constant=_refuse)
        except (ValueError, RecursionError):
            continue
        try:  # QMP cannot carry lone surrogates or noncharacters (QEMU's JSON refuses them)
            from_json(json.dumps(obj))
        except QmpError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_blockdev_add_as_qemu_system(images: dict[str, Path]) -> None:
    need(qmp.QEMU_SYSTEM)
    bad = [*_json_objects(), *QMP_BAD]
    assert len(bad) > 30
    good = [[parse_blockdev(fill(arg, images, f"g{i}")) for arg in group]
            for i, group in enumerate(GOOD)]
    async with qmp.qemu_system() as vm:
        mismatches = []
        for args in bad:
            with pytest.raises(ExecuteError) as err:
                await vm.execute("blockdev-add", args)
            try:
                blockdev_options(args)
            except QmpError as exc:
                mine: str | None = str(exc)
            else:
                mine = None
            if str(err.value) != mine:
                mismatches.append((args, str(err.value), mine))
        for group in good:  # typed by us, keyval ones included
            for args in group:
                await vm.execute("blockdev-add", args)
            for args in reversed(group):  # (each group opens the same images)
                await vm.execute("blockdev-del", {"node-name": args["node-name"]})
    assert not mismatches
