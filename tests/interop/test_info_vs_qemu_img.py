"""``dirtybits info`` against ``qemu-img info``: JSON key for key, human text line for line.

The JSON is also compared as raw text: dirtybits prints keys in QEMU's QDict order, so even a
naive ``diff`` of the two outputs is empty.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dirtybits.format.qcow2.header import EXT_BITMAPS, HeaderCluster
from peers import run, sh

pytestmark = pytest.mark.interop

Cli = Callable[..., "subprocess.CompletedProcess[str]"]


def create(w: Path, name: str, opts: str = "", size: str = "64M", *extra: str) -> Path:
    sh("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), *extra,
       name, size, cwd=w)
    return w / name


def plain(w: Path) -> str:
    path = create(w, "plain.qcow2")
    sh("qemu-io", "-c", "write -P 1 0 1M", path)
    return "plain.qcow2"


def backing_chain(w: Path) -> str:
    create(w, "base.qcow2", "", "64M")
    create(w, "mid.qcow2", "", "64M", "-b", "base.qcow2", "-F", "qcow2")
    create(w, "top.qcow2", "", "64M", "-b", str(w / "mid.qcow2"), "-F", "qcow2")
    return "top.qcow2"


def backing_raw(w: Path) -> str:
    (w / "base.raw").write_bytes(bytes(1 << 20))
    create(w, "over.qcow2", "", "1M", "-b", "base.raw", "-F", "raw")
    return "over.qcow2"


def data_file_raw(w: Path) -> str:
    create(w, "df.qcow2", "data_file=df.raw,data_file_raw=on", "16M")
    return "df.qcow2"


def data_file(w: Path) -> str:
    create(w, "df2.qcow2", "data_file=df2.raw", "16M")
    return "df2.qcow2"


def compat_010(w: Path) -> str:
    create(w, "v2.qcow2", "compat=0.10")
    return "v2.qcow2"


def refcount_bits_1(w: Path) -> str:
    create(w, "rc1.qcow2", "refcount_bits=1")
    return "rc1.qcow2"


def clusters_2m(w: Path) -> str:
    create(w, "big.qcow2", "cluster_size=2M", "3G")
    return "big.qcow2"


def clusters_512(w: Path) -> str:
    create(w, "small.qcow2", "cluster_size=512", "100k")
    return "small.qcow2"


def features(w: Path) -> str:
    create(w, "feat.qcow2", "extended_l2=on,compression_type=zstd,lazy_refcounts=on")
    return "feat.qcow2"


def dirty_corrupt(w: Path) -> str:
    path = create(w, "dc.qcow2", "lazy_refcounts=on")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 3))
    return "dc.qcow2"


def bitmaps(w: Path) -> str:
    path = create(w, "bm.qcow2", "", "1M")
    sh("qemu-img", "bitmap", "--add", path, "b0")
    sh("qemu-img", "bitmap", "--add", "-g", "4096", path, "b1")
    sh("qemu-img", "bitmap", "--disable", path, "b1")
    sh("qemu-io", "-c", "write 0 64k", path)
    return "bm.qcow2"


def bitmap_in_use(w: Path) -> str:
    """A bitmap left ``in-use`` (as after a crash): flag poked into the directory entry."""
    name = bitmaps(w)
    path = w / name
    with open(path, "rb") as f:
        hc = HeaderCluster.unpack(f.read(1 << 16))
    ext = hc.extension(EXT_BITMAPS)
    assert ext is not None
    dir_offset = struct.unpack(">Q", ext.data[16:24])[0]
    with open(path, "r+b") as f:
        f.seek(dir_offset + 12)
        flags = struct.unpack(">I", f.read(4))[0]
        f.seek(dir_offset + 12)
        f.write(struct.pack(">I", flags | 1))
    return name


def snapshots(w: Path) -> str:
    path = create(w, "snap.qcow2")
    sh("qemu-img", "snapshot", "-c", "first", path)
    sh("qemu-io", "-c", "write 0 64k", path)
    sh("qemu-img", "snapshot", "-c", "a-rather-long-snapshot-name", path)
    return "snap.qcow2"


def raw(w: Path) -> str:
    (w / "disk.raw").write_bytes(b"x" * 1000)  # not a sector multiple: QEMU rounds up
    return "disk.raw"


KINDS: dict[str, Callable[[Path], str]] = {
    "plain": plain,
    "backing-chain": backing_chain,
    "backing-raw": backing_raw,
    "data-file-raw": data_file_raw,
    "data-file": data_file,
    "compat=0.10": compat_010,
    "refcount_bits=1": refcount_bits_1,
    "cluster_size=2M": clusters_2m,
    "cluster_size=512": clusters_512,
    "extl2-zstd-lazy": features,
    "dirty-corrupt": dirty_corrupt,
    "bitmaps": bitmaps,
    "bitmap-in-use": bitmap_in_use,
    "snapshots": snapshots,
    "raw": raw,
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("chain", [False, True], ids=["single", "backing-chain"])
def test_info_matches_qemu_img(kind: str, chain: bool, workdir: Path,
                               qemu_tools: dict[str, str], dirtybits_cli: Cli) -> None:
    name = KINDS[kind](workdir)
    extra = ["--backing-chain"] if chain else []
    for output in ("json", "human"):
        theirs = run("qemu-img", "info", f"--output={output}", *extra, name, cwd=workdir)
        ours = dirtybits_cli("info", f"--output={output}", *extra, name)
        assert theirs.returncode == 0, theirs.stderr
        assert ours.returncode == 0, ours.stderr
        if output == "json":
            assert json.loads(ours.stdout) == json.loads(theirs.stdout)
        assert ours.stdout.splitlines() == theirs.stdout.splitlines()
        assert ours.stdout == theirs.stdout


def test_absolute_path_resolves_relative_backing_file(workdir: Path, qemu_tools: dict[str, str],
                                                      dirtybits_cli: Cli) -> None:
    backing_chain(workdir)
    for target in (workdir / "top.qcow2", workdir / "mid.qcow2"):
        theirs = run("qemu-img", "info", "--backing-chain", "--output=json", target)
        ours = dirtybits_cli("info", "--backing-chain", "--output=json", target, cwd=Path("/"))
        assert json.loads(ours.stdout) == json.loads(theirs.stdout)
        human = dirtybits_cli("info", target, cwd=Path("/")).stdout
        assert human == run("qemu-img", "info", target).stdout
    # mid.qcow2 names its backing file relatively: the human form shows where it really is.
    assert f"(actual path: {workdir / 'base.qcow2'})" in human


def test_forced_raw_format_on_qcow2(workdir: Path, qemu_tools: dict[str, str],
                                    dirtybits_cli: Cli) -> None:
    name = plain(workdir)
    theirs = run("qemu-img", "info", "-f", "raw", "--output=json", name, cwd=workdir)
    ours = dirtybits_cli("info", "-f", "raw", "--output=json", name)
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)


def test_missing_backing_file_fails_only_with_backing_chain(
        workdir: Path, qemu_tools: dict[str, str], dirtybits_cli: Cli) -> None:
    create(workdir, "orphan.qcow2", "", "1M", "-u", "-b", "gone.qcow2", "-F", "qcow2")
    theirs = run("qemu-img", "info", "--output=json", "orphan.qcow2", cwd=workdir)
    ours = dirtybits_cli("info", "--output=json", "orphan.qcow2")
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    theirs = run("qemu-img", "info", "--backing-chain", "orphan.qcow2", cwd=workdir)
    ours = dirtybits_cli("info", "--backing-chain", "orphan.qcow2")
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (1, "")
    assert "gone.qcow2" in ours.stderr


def test_not_qcow2_with_forced_format(workdir: Path, qemu_tools: dict[str, str],
                                      dirtybits_cli: Cli) -> None:
    name = raw(workdir)
    theirs = run("qemu-img", "info", "-f", "qcow2", name, cwd=workdir)
    ours = dirtybits_cli("info", "-f", "qcow2", name)
    assert ours.returncode == theirs.returncode == 1
    assert "Image is not in qcow2 format" in ours.stderr


def test_unknown_incompatible_features_are_refused_with_qemus_words(
        workdir: Path, qemu_tools: dict[str, str], dirtybits_cli: Cli) -> None:
    path = create(workdir, "future.qcow2")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", (1 << 20) | (1 << 33)))
    for command in ("info", "check"):
        theirs = run("qemu-img", command, "future.qcow2", cwd=workdir)
        ours = dirtybits_cli(command, "future.qcow2")
        assert ours.returncode == theirs.returncode == 1
        reason = theirs.stderr.strip().split("': ", 1)[1]
        assert reason == "Unsupported qcow2 feature(s): Unknown incompatible feature: 200100000"
        assert ours.stderr.strip().endswith(reason)
