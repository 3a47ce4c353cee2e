"""Fixtures shared by every test directory.

- ``qemu_tools``: paths of the real QEMU tools the interop tests run against. Every test marked
  ``interop`` (and every test under ``tests/interop``) needs them. When the run is strict
  (``DIRTYBITS_REQUIRE_INTEROP=1``, which ``scripts/test`` sets, or ``CI=true``) a missing
  tool or a skipped interop test is a failure; otherwise interop tests skip and say which tool
  is missing.
- ``dirtybits_cli``: runs ``python -m dirtybits.cli.main ARGS...`` in a subprocess.
- ``workdir``: an empty directory for the test's files.

Running the QEMU peers: the ``peers`` package (``tests/peers``), importable from every test
directory and from ``bench/`` (pyproject's pytest config puts ``tests/`` on ``sys.path``):
``peers.sh/qemu_img/qemu_io/db`` run a command and check its exit status, ``peers.qemu_nbd``
serves an image on a unix socket, ``peers.nbd_map`` is ``nbdinfo --map`` through it,
``peers.nbd`` serves an image with ``qemu-nbd`` or ``dirtybits nbd`` (unix socket or TCP,
TLS certificates from ``make_x509``) and runs nbdinfo, nbdcopy and libnbd Python scripts
(under Debian's ``/usr/bin/python3``, which python3-libnbd is built for) against it, and
``peers.qmp`` starts ``qemu-system-x86_64 -M none`` or ``qemu-storage-daemon`` with a
connected ``qemu.qmp`` client.

Timeouts (pytest-timeout): every test has a default of 600 s (``timeout`` in pyproject), four
times the slowest test of a full run on the shared 2-core machine (``--durations``, load 5-7:
``test_removing_any_sync_produces_a_failing_state`` 128-145 s, the kill -9 sweeps 33-122 s,
``test_create_matches_qemu_img`` of a 128G image on 512-byte clusters 66 s, nothing else over
35 s); it fails a hung test (``timeout_method = "signal"``: SIGALRM raises in the test, so
``finally`` blocks and context managers still stop the servers and processes it started)
instead of hanging CI. Tests that
start servers (qemu-nbd, QEMU over QMP, our own) must set a short timeout of their own,
``@pytest.mark.timeout(N)``, N a few times what they need. Tests that arm SIGALRM themselves
(``tests/unit/test_wrong_paths.py``, ``tests/fuzz/test_fuzz_snapshots.py``) replace that
timer while they run their own guard.

Asyncio tests (pytest-asyncio, strict mode) are marked ``@pytest.mark.asyncio``; each gets an
event loop of its own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Generator
from pathlib import Path

import pytest
from hypothesis import settings

import peers

QEMU_TOOLS = peers.QEMU_TOOLS
INTEROP_DIR = Path(__file__).parent / "interop"


def interop_required() -> bool:
    return os.environ.get("DIRTYBITS_REQUIRE_INTEROP") == "1" or os.environ.get("CI") == "true"


# Full runs (scripts/test, CI) share a 2-core machine: no per-example deadline there, and a
# failing example is printed so it can be replayed. HYPOTHESIS_PROFILE=... overrides.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if interop_required() else "default")
)


def find_qemu_tools() -> tuple[dict[str, str], list[str]]:
    """(found tool -> path, missing tool names)."""
    found = {name: path for name in QEMU_TOOLS if (path := shutil.which(name))}
    return found, [name for name in QEMU_TOOLS if name not in found]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/interop is an interop test, marked or not.
    for item in items:
        if item.path.is_relative_to(INTEROP_DIR):
            item.add_marker(pytest.mark.interop)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("interop") is None:
        return
    _, missing = find_qemu_tools()
    if not missing:
        return
    reason = f"interop test needs {', '.join(missing)} (run scripts/setup to install them)"
    if interop_required():
        pytest.fail(f"{reason}; interop tests may not be skipped in this run", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    # In a strict run an interop test that skipped itself is a failure: they must really run.
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and interop_required()
        and item.get_closest_marker("interop") is not None
    ):
        report.outcome = "failed"
        report.longrepr = f"interop test skipped in a strict run: {report.longrepr}"


@pytest.fixture(scope="session")
def qemu_tools() -> dict[str, str]:
    """Paths of qemu-img, qemu-io, qemu-nbd and nbdinfo (skip or fail when one is missing)."""
    found, missing = find_qemu_tools()
    if missing:
        reason = f"needs {', '.join(missing)} (run scripts/setup to install them)"
        if interop_required():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory for this test's files (also the default cwd of ``dirtybits_cli``)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def dirtybits_cli(workdir: Path) -> CliRunner:
    """``dirtybits_cli("info", path, check=True)`` runs the CLI in a subprocess, output captured."""

    def run(
        *args: str | os.PathLike[str],
        check: bool = False,
        input: str | None = None,
        cwd: Path | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "dirtybits.cli.main", *(os.fspath(a) for a in args)]
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            cwd=cwd or workdir,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"dirtybits {shlex.join(cmd[3:])} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
                pytrace=False,
            )
        return proc

    return run
