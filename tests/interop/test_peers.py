"""The QEMU peers the differential tests drive (``tests/peers``): ``qemu-system-x86_64 -M
none`` and ``qemu-storage-daemon`` over QMP (``qemu.qmp``), ``qemu-nbd`` on a unix socket."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import peers
from peers import qmp

pytestmark = pytest.mark.interop


def need(binary: str) -> None:
    if qmp.missing([binary]):
        pytest.skip(f"needs {binary} (run scripts/setup to install it)")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_qmp_client_talks_to_qemu_system_machine_none() -> None:
    need(qmp.QEMU_SYSTEM)
    async with qmp.qemu_system() as vm:
        version = await vm.execute("query-version")
        assert version["qemu"]["major"] >= 7, version
        assert await vm.execute("query-block") == []  # -nodefaults: no drives
        assert await vm.quit() == 0


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_qemu_system_opens_an_image_through_qmp(tmp_path: Path) -> None:
    need(qmp.QEMU_SYSTEM)
    img = tmp_path / "d.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    async with qmp.qemu_system() as vm:
        await vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk", "read-only":
                                          True, "file": {"driver": "file",
                                                         "filename": str(img)}})
        nodes = await vm.execute("query-named-block-nodes", {"flat": True})
        assert {n["node-name"]: n["drv"] for n in nodes}["disk"] == "qcow2"
    # the context manager stopped it without a quit


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_qmp_client_talks_to_qemu_storage_daemon() -> None:
    need(qmp.STORAGE_DAEMON)
    async with qmp.storage_daemon("--blockdev", "null-co,node-name=null0,size=1048576") as qsd:
        assert (await qsd.execute("query-version"))["qemu"]["major"] >= 7
        nodes = await qsd.execute("query-named-block-nodes", {"flat": True})
        assert [n["node-name"] for n in nodes] == ["null0"]
        assert await qsd.quit() == 0


@pytest.mark.timeout(120)
def test_a_test_past_its_timeout_still_stops_its_qemu(tmp_path: Path) -> None:
    """pytest-timeout's signal method fails the test inside the event loop; the loop's
    teardown cancels the test, and ``qemu_system`` stops its process on the way out."""
    need(qmp.QEMU_SYSTEM)
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "test_hang.py").write_text(
        "import asyncio\n"
        "import pytest\n"
        "from peers import qmp\n\n\n"
        "@pytest.mark.asyncio\n"
        "@pytest.mark.timeout(3)\n"
        "async def test_hangs() -> None:\n"
        "    async with qmp.qemu_system() as vm:\n"
        "        open('pid', 'w').write(str(vm.proc.pid))\n"
        "        await asyncio.sleep(60)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(root / "pyproject.toml"), "--rootdir", str(tmp_path), "test_hang.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1 and "Timeout (>3.0s)" in proc.stdout, proc.stdout
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "qemu" not in Path(
        f"/proc/{pid}/cmdline").read_text(errors="replace"), f"qemu-system {pid} still runs"


@pytest.mark.timeout(60)
def test_qemu_nbd_serves_on_a_unix_socket_and_stops(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    peers.qemu_io(img, "write -P 1 64k 64k")
    with peers.qemu_nbd(img) as nbd:
        out = peers.nbdinfo_map(nbd.uri).stdout
    assert nbd.proc.returncode is not None and not nbd.sock.exists()
    assert [line.split()[:3] for line in out.splitlines()] == [
        ["0", "65536", "3"], ["65536", "65536", "0"], ["131072", "917504", "3"]]


@pytest.mark.timeout(60)
def test_qemu_nbd_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"did not come up.*No such file"), \
            peers.qemu_nbd(tmp_path / "absent.qcow2"):
        pass
