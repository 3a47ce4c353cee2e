"""``dirtybits.services.qemu_io``: one command line in, qemu-io's text out, with no terminal
(what a daemon's ``human-monitor-command qemu-io NODE "CMD"`` needs)."""

from __future__ import annotations

import io
from pathlib import Path

from dirtybits.block.raw import RawImage
from dirtybits.services.qemu_io import Executor


def test_execute_returns_the_text_of_one_command(tmp_path: Path) -> None:
    path = str(tmp_path / "disk.raw")
    RawImage.create(path, 1 << 20)
    out, err = io.StringIO(), io.StringIO()
    with RawImage(path) as driver:
        ex = Executor(driver, out, err, prog="qemu-io", sleep=lambda s: None)
        done = ex.execute("write -q -P 0xab 0 4k")
        assert (done.text, done.failed, done.quit) == ("", False, False)
        done = ex.execute("read -P 0xcd 0 512")  # a mismatch: stdout text, failed
        assert done.text.startswith("Pattern verification failed at offset 0, 512 bytes\n")
        assert done.failed
        done = ex.execute("bogus")  # a stderr complaint, in the same text
        assert (done.text, done.failed) == ('command "bogus" not found\n', True)
        done = ex.execute("length")
        assert (done.text, done.failed) == ("1 MiB\n", False)
        assert ex.execute("quit").quit
        assert ex.failed  # the executor remembers that some command failed
    assert out.getvalue() == err.getvalue() == ""  # nothing went to the streams
