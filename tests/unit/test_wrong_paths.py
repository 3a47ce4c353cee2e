"""Every subcommand against every kind of wrong path: one line, a non-zero exit, no hang.

A directory, a FIFO or a character device (/dev/null) where an image (or a backing file, a
data file, a merge source, a backup, a drive) is expected is an ordinary mistake. QEMU's file
driver refuses all three ("'file' driver requires 'P' to be a regular file"; qemu-img hangs
opening a FIFO, qemu-io does not): dirtybits must refuse them the same way, in one line, and
must not block on a FIFO nor change the wrong path. The runs are in-process (``main``), each
under an alarm so a blocking open fails the test instead of hanging it; a subprocess run of
the FIFO case checks the real entry point too.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from dirtybits.block.container import Container
from dirtybits.block.raw import RawImage
from dirtybits.cli.main import main
from dirtybits.qcow2.image import Qcow2Image
from peers import db

MiB = 1 << 20
KINDS = ("directory", "fifo", "chardev")

# {P}: the wrong path; {G}: a good qcow2 with bitmap b0; {R}: a good raw image; {C}: a good
# container; {T}: a free name for a new file; {BR}/{BQ}: a qcow2 whose raw/qcow2 backing file
# is the wrong path
COMMANDS = {
    "info": ["info", "{P}"],
    "info-qcow2": ["info", "-f", "qcow2", "{P}"],
    "info-raw": ["info", "-f", "raw", "{P}"],
    "info-chain": ["info", "--backing-chain", "{P}"],
    "info-backing-raw": ["info", "--backing-chain", "{BR}"],
    "check": ["check", "{P}"],
    "check-repair": ["check", "-r", "all", "{P}"],
    "map": ["map", "{P}"],
    "map-qcow2": ["map", "-f", "qcow2", "{P}"],
    "map-raw": ["map", "-f", "raw", "{P}"],
    "map-backing-raw": ["map", "{BR}"],
    "compare-second": ["compare", "{G}", "{P}"],
    "compare-first": ["compare", "{P}", "{G}"],
    "convert-source": ["convert", "-O", "qcow2", "{P}", "{T}"],
    "convert-target-qcow2": ["convert", "-O", "qcow2", "{G}", "{P}"],
    "convert-target-raw": ["convert", "-O", "raw", "{G}", "{P}"],
    "io": ["io", "-c", "read 0 512", "{P}"],
    "io-raw-write": ["io", "-f", "raw", "-c", "write 0 512", "{P}"],
    "io-readonly": ["io", "-r", "-c", "read 0 512", "{P}"],
    "io-backing-raw": ["io", "-c", "read 0 512", "{BR}"],
    "io-backing-qcow2": ["io", "-c", "write 0 512", "{BQ}"],
    "bitmap-dump": ["bitmap", "--dump", "{P}", "b0"],
    "bitmap-add": ["bitmap", "--add", "{P}", "b0"],
    "bitmap-merge-source": ["bitmap", "--merge", "b0", "-b", "{P}", "{G}", "b1"],
    "bitmap-recover-reference": ["bitmap", "--recover", "--reference", "{P}", "{G}", "b0"],
    "amend": ["amend", "-o", "resilient=on", "{P}"],
    "create-qcow2": ["create", "-f", "qcow2", "{P}", "1M"],
    "create-raw": ["create", "-f", "raw", "{P}", "1M"],
    "create-backing-raw": ["create", "-f", "qcow2", "-b", "{P}", "-F", "raw", "{T}", "1M"],
    "create-backing-qcow2": ["create", "-f", "qcow2", "-b", "{P}", "-F", "qcow2", "{T}"],
    "create-data-file": ["create", "-f", "qcow2", "-o", "data_file={P}", "{T}", "1M"],
    "container-create": ["container", "create", "{P}"],
    "container-list": ["container", "list", "{P}"],
    "container-attach": ["container", "attach", "{P}", "{R}"],
    "container-attach-drive": ["container", "attach", "{C}", "{P}"],
    "demo": ["demo", "--dir", "{P}"],
}
# a directory is the right thing for --dir
SKIP = {("demo", "directory")}


class Hang(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang("the command blocked (a FIFO opened for reading?)")


@pytest.fixture
def alarm() -> Iterator[None]:
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def wrong_path(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        path = tmp_path / "adir"
        path.mkdir()
    elif kind == "fifo":
        path = tmp_path / "afifo"
        os.mkfifo(path)
    else:
        path = Path("/dev/null")
    return path


def state(path: Path) -> tuple[int, list[str]]:
    st = path.lstat()
    return stat.S_IFMT(st.st_mode), sorted(os.listdir(path)) if path.is_dir() else []


def files(tmp_path: Path, wrong: Path) -> dict[str, str]:
    good = tmp_path / "good.qcow2"
    Qcow2Image.create(str(good), MiB)
    assert main(["bitmap", "--add", str(good), "b0"]) == 0
    drive = tmp_path / "good.raw"
    RawImage.create(str(drive), MiB)
    cont = tmp_path / "c.qcow2"
    Container.create(str(cont), 4 * MiB)
    over = {}
    for fmt in ("raw", "qcow2"):
        over[fmt] = tmp_path / f"over-{fmt}.qcow2"
        Qcow2Image.create(str(over[fmt]), MiB, backing_file=str(wrong), backing_format=fmt)
    return {"P": str(wrong), "G": str(good), "R": str(drive), "C": str(cont),
            "T": str(tmp_path / "new.qcow2"), "BR": str(over["raw"]), "BQ": str(over["qcow2"])}


@pytest.mark.parametrize("command, kind", [(c, k) for c in sorted(COMMANDS) for k in KINDS
                                            if (c, k) not in SKIP])
def test_wrong_path_gets_one_line(command: str, kind: str, tmp_path: Path, alarm: None,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    wrong = wrong_path(tmp_path, kind)
    names = files(tmp_path, wrong)
    before = state(wrong)
    capsys.readouterr()
    argv = [word.format(**names) for word in COMMANDS[command]]
    signal.setitimer(signal.ITIMER_REAL, 20)
    try:
        rc = main(argv)  # an exception escaping main is the traceback a user would see
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    _, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc != 0, (argv, err)
    assert "Traceback" not in err
    # one line, or two where qemu-img prints two (a backing file: "Could not open backing
    # image." follows)
    assert 1 <= len(lines) <= 2, err
    assert len(lines) == 1 or lines[1] == "Could not open backing image.", err
    assert lines[0].startswith(f"dirtybits {argv[0]}: "), err
    assert str(wrong) in err or os.path.basename(str(wrong)) in err, err
    assert state(wrong) == before, "the wrong path was changed"
    if "{T}" in COMMANDS[command]:
        assert not Path(names["T"]).exists(), "a failed command left a new file behind"


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_path_says_what_qemu_says(kind: str, tmp_path: Path, alarm: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The words are QEMU's file driver's (qemu-img info -f raw, qemu-io)."""
    wrong = wrong_path(tmp_path, kind)
    refusal = f"'file' driver requires '{wrong}' to be a regular file"
    signal.setitimer(signal.ITIMER_REAL, 20)
    assert main(["map", "-f", "raw", str(wrong)]) == 1
    assert main(["io", "-r", "-c", "read 0 512", str(wrong)]) == 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    assert capsys.readouterr().err == (
        f"dirtybits map: Could not open '{wrong}': {refusal}\n"
        f"dirtybits io: can't open device {wrong}: {refusal}\n")


def test_fifo_through_the_real_entry_point(tmp_path: Path) -> None:
    """``python -m dirtybits.cli.main`` on a FIFO: one line, exit 1, within seconds."""
    fifo = tmp_path / "afifo"
    os.mkfifo(fifo)
    for argv in (["info", str(fifo)], ["bitmap", "--dump", str(fifo), "b0"]):
        proc = db(*argv, ok=None, timeout=60)
        assert proc.returncode == 1
        assert proc.stderr == (f"dirtybits {argv[0]}: 'file' driver requires '{fifo}' to be "
                               "a regular file\n")


@pytest.mark.parametrize("where", ["file", "fifo", "chardev", "under-a-file", "proc"])
def test_demo_dir_that_cannot_be_used(where: str, tmp_path: Path, alarm: None,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = {"file": tmp_path / "afile", "fifo": tmp_path / "afifo", "chardev": Path("/dev/null"),
            "under-a-file": tmp_path / "afile" / "sub", "proc": Path("/proc/dirtybits-demo")
            }[where]
    (tmp_path / "afile").write_bytes(b"keep")
    os.mkfifo(tmp_path / "afifo")
    signal.setitimer(signal.ITIMER_REAL, 20)
    rc = main(["demo", "--dir", str(path)])
    signal.setitimer(signal.ITIMER_REAL, 0)
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"dirtybits demo: cannot use '{path}' for the demo's files: ")
    assert err.count("\n") == 1
    assert (tmp_path / "afile").read_bytes() == b"keep"


def test_stray_os_error_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The last resort in ``main``: an ``OSError`` no layer turned into a DirtybitsError."""
    from dirtybits.cli import info

    def boom(args: object) -> int:
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(info, "run", boom)
    assert main(["info", "whatever"]) == 1
    assert capsys.readouterr().err == f"dirtybits info: {tmp_path / 'x'}: Permission denied\n"
