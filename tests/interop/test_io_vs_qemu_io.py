"""One command list, two tools: ``qemu-io`` and ``dirtybits io`` must leave the same image
and print the same thing (timings aside) with the same exit status.

Each case runs on two copies of one fresh image. Output lines are compared whole, after the
timing part of qemu-io's statistics line (``64 KiB, 1 ops; <time and rates>``) is cut and the
program name in error messages is unified. qcow2 cases compare guest contents with
``qemu-img compare`` and also require ``qemu-img check`` to pass on the image dirtybits wrote.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from peers import qemu_img, run

pytestmark = pytest.mark.interop

CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]  # the dirtybits_cli fixture

STATS = re.compile(r"^(\S+ \S+, \d+ ops; )(\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) "
                   r"\(\S+ \S+/sec and \S+ ops/sec\)$")
MACHINE_STATS = re.compile(r"^(\d+,\d+,)\d+:\d\d:\d\d\.\d\d,\S+,\S+$")


def normalize(text: str, prog: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        m = STATS.match(line) or MACHINE_STATS.match(line)
        if m:
            line = m.group(1) + "<time>"
        lines.append(line.replace(f"{prog}:", "<prog>:"))
    return lines


def run_both(cli: CliRunner, workdir: Path, fmt: str,
             commands: list[str], *, size: str = "1M", options: tuple[str, ...] = ()
             ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str],
                        Path, Path]:
    ref, ours = workdir / f"qemu.{fmt}", workdir / f"dirtybits.{fmt}"
    qemu_img("create", "-q", "-f", fmt, ref, size)
    shutil.copyfile(ref, ours)
    cmd_args = [arg for c in commands for arg in ("-c", c)]
    q = run("qemu-io", "-f", fmt, *options, *cmd_args, ref)
    d = cli("io", "-f", fmt, *options, *cmd_args, ours)
    return q, d, ref, ours


def assert_same_behaviour(q: subprocess.CompletedProcess[str],
                          d: subprocess.CompletedProcess[str]) -> None:
    q_out, d_out = normalize(q.stdout, "qemu-io"), normalize(d.stdout, "dirtybits io")
    if q_out:
        assert d_out[:1] == q_out[:1]  # the line scripts grep for, kept exact
    assert d_out == q_out
    assert normalize(d.stderr, "dirtybits io") == normalize(q.stderr, "qemu-io")
    assert d.returncode == q.returncode


# Each list was run against qemu-io 7.2 while writing dirtybits io; all of them pass there.
RAW_CASES = {
    "write-read": ["write -P 0xab 0 64k", "read -P 0xab 0 64k", "write 1 3", "read -v 0 40",
                   "write -P 7 0x1000 0x800", "r -q -P 7 4k 2k", "w -q 513 1"],
    "zeroes-discard": ["write -P 5 0 128k", "write -z 0 4k", "write -z -u 4k 4k",
                       "discard 64k 64k", "d -q 8k 8k", "read -P 0 0 16k", "read -P 5 16k 48k",
                       "flush", "f"],
    "pattern-failures": ["write -P 1 0 4k", "read -P 2 0 4k", "read -q -P 2 0 512",
                         "read -P 1 -s 8 -l 8 0 16", "read -P 0 -s 8 -l 8 4k 16"],
    "ranges": ["read 2M 4k", "read 1020k 8k", "write 1020k 8k", "discard 1023k 2k",
               "write -z 2M 0", "read 1M 0", "write 1M 0", "discard 1M 0", "alloc 1020k 8k",
               "alloc 2M", "read 0 3G", "write 0 3G", "discard 0 3G"],
    "syntax-errors": ["bogus", "read", "read 0", "read -x 0 1", "read 0 1 -P", "read 0 -1",
                      "read abc 4k", "read 4q 4k", "read 1.5 1", "write -P 256 0 1",
                      "write -P 08 0 1", "write -u 0 4k", "write -z -P 1 0 4k", "flush 1",
                      "truncate 1 2 3 4", "sleep abc", "read -l 5 0 16", "read -q -- -1 1",
                      "write -b -z 0 512", "write -f -c 0 512", "read -b 1 512"],
    "number-syntax": ["write -P 010 0 1", "write -P +7 1 1", "write -P -0 2 1",
                      "write -P 0XFF 3 1", "read -v 0 4", "read 0x10k 0", "read 1.5k 0",
                      "read 0.5K 1.k", "write -q -P 9 1.5k 010", "read -v 1536 16"],
    "getopt": ["write 0 512 -q -P 0x33", "read -qv 0 16", "read -P0x33 -q 0 512",
               "read -- 0 16", "write -z -z -q 0 1", "write -P 1 -P 2 0 1", "read -v 0 2"],
    "stats-and-info": ["write -C 0 4k", "read -C -v 0 4", "discard -C 0 4k", "length", "l",
                       "info", "i", "map", "alloc 0", "alloc 0 0", "alloc 512 1"],
    "truncate": ["truncate 2M", "length", "write -P 3 1536k 64k", "read -P 3 1536k 64k",
                 "truncate -m bogus 1M", "truncate -x 1M", "truncate -m off abc",
                 "truncate -m full 3M", "length", "truncate -m metadata 4M", "length"],
    "quit": ["write -P 0x5a 0 512", "quit", "write -P 0x5b 0 512"],
    "sleep": ["sleep 10", "sleep 0x10", "sleep 010", "sleep 08", "sleep -5", "sleep 1 2"],
    "unsupported-vmstate": ["read -b 0 512", "write -b 0 512", "write -c 0 512"],
}


@pytest.mark.parametrize("name", sorted(RAW_CASES))
def test_raw_same_image_and_output(name: str, qemu_tools: dict[str, str],
                                   dirtybits_cli: CliRunner, workdir: Path) -> None:
    q, d, ref, ours = run_both(dirtybits_cli, workdir, "raw", RAW_CASES[name])
    assert ours.read_bytes() == ref.read_bytes()
    assert_same_behaviour(q, d)


def test_read_pattern_failure_reported_the_same(qemu_tools: dict[str, str],
                                                dirtybits_cli: CliRunner,
                                                workdir: Path) -> None:
    commands = ["write -q -P 0x11 0 64k", "read -q -P 0x11 0 64k", "read -q -P 0x12 4k 8k",
                "read -q -P 0x11 -s 4k -l 512 62k 8k", "read -q -P 0x11 -l 2k 62k 8k"]
    q, d, _, _ = run_both(dirtybits_cli, workdir, "raw", commands)
    expected = ["Pattern verification failed at offset 4096, 8192 bytes",
                "Pattern verification failed at offset 67584, 512 bytes"]
    assert q.stdout.splitlines() == expected  # what qemu-io 7.2 prints
    assert d.stdout.splitlines() == expected
    assert q.returncode == d.returncode == 1


def test_read_only_refusals(qemu_tools: dict[str, str], dirtybits_cli: CliRunner,
                            workdir: Path) -> None:
    commands = ["write 0 4k", "discard 0 4k", "truncate 2M", "flush", "write -z 0 4k",
                "read -q 0 4k", "write 0", "write -P 999 0 1"]
    q, d, ref, ours = run_both(dirtybits_cli, workdir, "raw", commands,
                               options=("-r",))
    assert ours.read_bytes() == ref.read_bytes()
    assert_same_behaviour(q, d)


def test_commands_from_stdin_give_the_same_image(qemu_tools: dict[str, str],
                                                 dirtybits_cli: CliRunner,
                                                 workdir: Path) -> None:
    script = "".join(f"write -q -P {i} {i * 3}k {i + 1}k\n" for i in range(1, 40))
    ref, ours = workdir / "qemu.raw", workdir / "dirtybits.raw"
    qemu_img("create", "-q", "-f", "raw", ref, "1M")
    shutil.copyfile(ref, ours)
    # qemu-io prints a "qemu-io> " prompt per line even on a pipe; only the images compare.
    q = run("qemu-io", "-f", "raw", ref, input=script)
    d = dirtybits_cli("io", "-f", "raw", ours, input="# comment\n\n" + script)
    assert q.returncode == d.returncode == 0
    assert d.stdout == d.stderr == ""
    assert ours.read_bytes() == ref.read_bytes()


# ---------------------------------------------------------------------------- qcow2

QCOW2_CASES = {
    "write-read": ["write -P 0xab 0 64k", "read -P 0xab 0 64k", "write 1 3", "read -v 0 40",
                   "write -P 7 100k 3k", "read -P 7 100k 3k", "map", "alloc 0 1M", "length"],
    "discard-and-zero-allocated": ["write -P 1 0 1M", "discard 64k 64k",
                                   "write -z -u 256k 128k", "write -z 512k 64k", "map",
                                   "read -P 0 256k 128k", "read -P 1 128k 128k", "read 1M 1"],
    "grow": ["truncate 2M", "length", "write -P 3 1536k 64k", "map", "info",
             "read -P 3 1536k 64k", "read -P 0 1M 512k"],
    "unaligned": ["write -P 0x21 1000 70000", "write -P 0x22 65535 2", "read -v 65528 16",
                  "read -P 0x21 1000 64535", "flush"],
}


@pytest.mark.parametrize("name", sorted(QCOW2_CASES))
def test_qcow2_same_guest_data_and_output(name: str, qemu_tools: dict[str, str],
                                          dirtybits_cli: CliRunner, workdir: Path) -> None:
    q, d, ref, ours = run_both(dirtybits_cli, workdir, "qcow2", QCOW2_CASES[name])
    assert_same_behaviour(q, d)
    compare = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", ref, ours)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    check = run("qemu-img", "check", "-f", "qcow2", ours)
    assert check.returncode == 0, check.stdout + check.stderr


# ---------------------------------------------------------------------------- file layout
# (create options, size, commands): the file dirtybits io leaves is qemu-io's, byte for byte:
# QEMU's allocator (refcount blocks past the run, refcount table growth in small clusters).
# Not here by design: a discard followed by a write before any flush (QEMU reuses the freed
# clusters at once; dirtybits only after the flush that makes the discard durable).
LAYOUT_CASES = {
    "qcow2-cases": ("", "1M", [c for cmds in QCOW2_CASES.values() for c in cmds
                               if c.split()[0] in ("write", "truncate")]),
    "whole-clusters": ("", "1G", ["write -P 1 0 20M", "write -z -u 4M 1M", "write -z 8M 1M",
                                  "discard 16M 1M", "flush", "write -P 2 100M 3M"]),
    "reftable-growth-512": ("cluster_size=512", "1G", ["write -P 1 0 1M",
                                                       "write -P 2 100M 10M",
                                                       "write -P 3 500M 8M"]),
    "refcount_bits=64-512": ("cluster_size=512,refcount_bits=64", "1G",
                             ["write -P 1 0 3M", "discard 512k 1M", "flush",
                              "write -P 2 100M 3M"]),
    "zeroes-discard-512": ("cluster_size=512", "64M",
                           ["write -P 1 0 10M", "write -z 2M 1M", "write -z -u 3M 1M",
                            "discard 5M 1M", "flush", "write -P 2 30M 6M"]),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_CASES))
def test_qcow2_same_file_bytes(name: str, qemu_tools: dict[str, str], dirtybits_cli: CliRunner,
                               workdir: Path) -> None:
    opts, size, commands = LAYOUT_CASES[name]
    ref, ours = workdir / "qemu.qcow2", workdir / "dirtybits.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), ref, size)
    shutil.copyfile(ref, ours)
    cmd_args = [arg for c in commands for arg in ("-c", c)]
    q = run("qemu-io", "-f", "qcow2", *cmd_args, ref)
    d = dirtybits_cli("io", "-f", "qcow2", *cmd_args, ours)
    assert q.returncode == d.returncode == 0, d.stdout + d.stderr
    assert ours.stat().st_size == ref.stat().st_size
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("options", [(), ("-r",)])
@pytest.mark.parametrize("layout", ["plain", "data-file"])
def test_info_lists_bitmaps_as_qemu_io(options: tuple[str, ...], layout: str,
                                       qemu_tools: dict[str, str], dirtybits_cli: CliRunner,
                                       workdir: Path) -> None:
    """``io -c info`` on an image with bitmaps (was: "cluster size: 0 bytes" and no format
    block, or no bitmaps with -r): qemu-io's text, bitmaps block included."""
    img = workdir / "b.qcow2"
    extra = ["-o", f"data_file={workdir / 'b.raw'},data_file_raw=on"] \
        if layout == "data-file" else []
    subprocess.run([tools_img := qemu_tools["qemu-img"], "create", "-q", "-f", "qcow2", *extra,
                    str(img), "1M"], check=True)
    subprocess.run([tools_img, "bitmap", "--add", str(img), "b0"], check=True)
    subprocess.run([tools_img, "bitmap", "--add", "--disable", "-g", "4096", str(img), "b1"],
                   check=True)
    q = subprocess.run([qemu_tools["qemu-io"], *options, "-c", "info", str(img)],
                       capture_output=True, text=True, timeout=120)
    d = dirtybits_cli("io", *options, "-c", "info", str(img))
    assert "bitmaps:" in q.stdout and "cluster size: 64 KiB" in q.stdout
    assert_same_behaviour(q, d)
