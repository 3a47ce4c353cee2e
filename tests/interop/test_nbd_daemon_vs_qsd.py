"""The daemon's NBD exports against qemu-storage-daemon's, from the same command line.

Both daemons start with the same ``--blockdev``, ``--object tls-creds-x509``,
``--nbd-server`` and ``--export`` options (qemu-storage-daemon's spelling) on copies of one
image, and the same clients run against both: nbdinfo over TLS (``--list``, the maps of
every context), qemu-img over TLS, a plaintext client refused; then writes through a
writable export, and after both quit the images and their bitmaps agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import peers
import peers.qmp
from peers import nbd, qemu_img, qemu_io

pytestmark = [pytest.mark.interop, pytest.mark.asyncio]
MiB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qsd-src")
    img = d / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", img, "frozen")
    qemu_io(img, "write -P 0x11 0 1M", "write -z 4M 1M", "write -P 0x22 9M 64k", fmt="qcow2")
    qemu_img("bitmap", "--disable", img, "frozen")
    return d


def _args(d: Path, certs: Path, sock: Path) -> list[str]:
    return ["--blockdev", f"driver=file,node-name=f0,filename={d / 'disk.qcow2'}",
            "--blockdev", "driver=qcow2,node-name=n0,file=f0",
            "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={certs}",
            "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
            "--export", "type=nbd,id=e0,node-name=n0,name=disk,writable=on,"
                        "bitmaps.0=b0,bitmaps.1=frozen,allocation-depth=on,description=d0"]


async def _session(ours: bool, d: Path, certs: Path) -> dict[str, Any]:
    sock = d / "nbd.sock"
    start = peers.qmp.dirtybits_serve if ours else peers.qmp.storage_daemon
    out: dict[str, Any] = {}
    async with start(*_args(d, certs, sock)) as vm:
        srv = nbd.Served("qsd", vm.proc, "disk", sock=sock)  # type: ignore[arg-type]
        uri = srv.tls_uri(certs)
        out["list"] = srv.scrub(nbd.nbdinfo("--list", "--json", uri).stdout)
        for ctx in ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0",
                    "qemu:dirty-bitmap:frozen"):
            out[ctx] = nbd.nbdinfo(f"--map={ctx}", uri).stdout
        obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"
        opts = srv.image_opts("tls-creds=tls0", "tls-hostname=localhost")
        qemu_io(opts, "write -P 0x33 2M 128k", "write -z 9M 64k", "flush",
                options=["--object", obj, "--image-opts"], fmt=None)
        out["b0 after"] = nbd.nbdinfo("--map=qemu:dirty-bitmap:b0", uri).stdout
        plain = nbd.nbdinfo(srv.uri, ok=None)
        out["plain"] = plain.returncode
        out["exports"] = await vm.execute("query-block-exports")
        out["busy"] = [b.get("busy") for n in await vm.execute("query-named-block-nodes")
                       for b in n.get("dirty-bitmaps", [])]
        try:
            await vm.execute("block-dirty-bitmap-clear", {"node": "n0", "name": "b0"})
        except Exception as exc:  # qemu.qmp's ExecuteError
            out["clear"] = str(exc)
        out["del"] = await vm.execute("block-export-del", {"id": "e0"})
        await vm.execute("nbd-server-stop")
        await vm.execute("quit")
    return out


@pytest.mark.timeout(120)
async def test_same_exports_same_answers(source: Path, tmp_path: Path) -> None:
    certs = nbd.make_x509(tmp_path / "certs")
    results = []
    for ours in (False, True):
        d = tmp_path / ("ours" if ours else "qsd")
        shutil.copytree(source, d)
        results.append(await _session(ours, d, certs))
    qsd, ours = results
    for key in qsd:
        assert qsd[key] == ours[key], f"{key}:\nqemu-storage-daemon: {qsd[key]}\nours: {ours[key]}"
    assert "qemu:dirty-bitmap:frozen" in qsd["list"] and qsd["plain"] == 1
    assert "2097152      131072    1  dirty" in qsd["b0 after"]
    assert "in use" in qsd["clear"]
    # the images after both quit: the same data, the same bitmaps, both clean
    a, b = tmp_path / "qsd" / "disk.qcow2", tmp_path / "ours" / "disk.qcow2"
    qemu_img("compare", a, b)
    qemu_img("check", b)
    assert peers.nbd_map(a, "b0") == peers.nbd_map(b, "b0")
    assert json.dumps(peers.qemu_bitmaps(a), sort_keys=True) == \
        json.dumps(peers.qemu_bitmaps(b), sort_keys=True)
