"""``dirtybits --log-level LEVEL`` / ``DIRTYBITS_LOG_LEVEL``: the package's log records on
stderr when asked, and not a byte more output than before when not."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dirtybits.block.raw import RawImage
from dirtybits.cli import main as cli_main
from dirtybits.qcow2.image import Qcow2Image

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_cli(*args: str, env_level: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != cli_main.LOG_ENV}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    if env_level is not None:
        env[cli_main.LOG_ENV] = env_level
    return subprocess.run([sys.executable, "-m", "dirtybits.cli.main", *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = str(tmp_path / "disk.qcow2")
    Qcow2Image.create(path, 1 << 20)
    return path


IO = ("io", "-c", "write -P 0x5a 0 4k", "-c", "read -q -P 0x5a 0 4k")


def test_default_prints_no_log_lines(image: str) -> None:
    proc = run_cli(*IO, image)
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert proc.stdout.startswith("wrote 4096/4096 bytes at offset 0\n")


@pytest.mark.parametrize("how", ["option", "option=", "env"])
def test_debug_logs_on_stderr_and_stdout_is_unchanged(image: str, how: str) -> None:
    if how == "option":
        proc = run_cli("--log-level", "debug", *IO, image)
    elif how == "option=":
        proc = run_cli("--log-level=DEBUG", *IO, image)
    else:
        proc = run_cli(*IO, image, env_level="debug")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any(" DEBUG dirtybits.qcow2.image: " in line and "opened read-write" in line
               for line in lines), lines
    assert any(" DEBUG dirtybits.qcow2.image: " in line and "closing" in line
               for line in lines), lines
    assert any(" DEBUG dirtybits.filelock: " in line for line in lines), lines
    assert any(line.endswith("dirtybits io: write -P 0x5a 0 4k") for line in lines), lines
    assert proc.stdout.splitlines()[0] == "wrote 4096/4096 bytes at offset 0"
    assert len(proc.stdout.splitlines()) == 2  # the read is quiet


def test_a_higher_level_hides_debug_lines(image: str) -> None:
    proc = run_cli("--log-level", "warning", *IO, image)
    assert proc.returncode == 0
    assert proc.stderr == ""


def test_invalid_levels_are_usage_errors(image: str) -> None:
    proc = run_cli("--log-level", "loud", "info", image)
    assert proc.returncode == 2
    assert "--log-level" in proc.stderr
    proc = run_cli("info", image, env_level="loud")
    assert proc.returncode == 2
    assert "DIRTYBITS_LOG_LEVEL: invalid level 'loud'" in proc.stderr


def test_in_process_calls_do_not_leak_the_setting(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli_main.LOG_ENV, raising=False)
    path = str(tmp_path / "disk.raw")
    RawImage.create(path, 1 << 20)
    assert cli_main.main(["--log-level", "debug", "io", "-c", "length", path]) == 0
    out, err = capsys.readouterr()
    assert out == "1 MiB\n"
    assert "DEBUG dirtybits.block.raw: " in err
    assert cli_main.main(["io", "-c", "length", path]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("1 MiB\n", "")
    assert logging.getLogger("dirtybits").level == logging.NOTSET
    assert not logging.getLogger("dirtybits").handlers
