"""The test support works: asyncio tests run (pytest-asyncio), a test past its timeout fails
(pytest-timeout), and the ``peers`` package imports from here (tests/unit)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import peers

ROOT = Path(__file__).resolve().parents[2]


async def double(x: int) -> int:
    await asyncio.sleep(0.01)
    return 2 * x


@pytest_asyncio.fixture
async def queue() -> AsyncIterator[asyncio.Queue[int]]:
    q: asyncio.Queue[int] = asyncio.Queue()
    yield q
    assert q.empty()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_asyncio_test_runs_a_coroutine(queue: asyncio.Queue[int]) -> None:
    task = asyncio.create_task(double(21))
    await queue.put(await asyncio.wait_for(task, 5))
    assert await queue.get() == 42


def test_every_test_has_a_default_timeout(pytestconfig: pytest.Config) -> None:
    assert float(pytestconfig.getini("timeout")) >= 300
    assert pytestconfig.getini("timeout_method") == "signal"


@pytest.mark.timeout(120)
def test_a_test_past_its_timeout_fails(tmp_path: Path) -> None:
    """A test sleeping past ``@pytest.mark.timeout(1)``, run by pytest with this project's
    configuration (its timeout method), fails with pytest-timeout's "Timeout" within seconds;
    the next test still runs."""
    (tmp_path / "test_sleeper.py").write_text(
        "import time\n"
        "import pytest\n\n\n"
        "@pytest.mark.timeout(1)\n"
        "def test_sleeps_too_long():\n"
        "    time.sleep(60)\n\n\n"
        "def test_after():\n"
        "    pass\n")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "test_sleeper.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=100)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Timeout" in proc.stdout, proc.stdout
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout
    assert elapsed < 50, elapsed


def test_peers_imports_from_every_test_directory() -> None:
    assert Path(peers.__file__).resolve() == ROOT / "tests" / "peers" / "__init__.py"
    assert "qemu-img" in peers.QEMU_TOOLS
