"""When a block node checkpoints its bitmaps (DESIGN.md, persistence protocol step 3).

A checkpoint writes the bitmap clusters that changed, syncs, and clears ``in_use``: after it a
crash leaves the bitmaps consistent. Between checkpoints a crash leaves them inconsistent, so the
policy trades a little write amplification for a short in-use window. Every trigger can be
turned off (``None``); close and an explicit flush always checkpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointPolicy:
    """Checkpoint triggers besides close and flush.

    ``interval``: seconds after which a bitmap left in use is checkpointed even under a steady
    stream of writes (bounds how long a crash can cost). ``idle``: seconds without writes after
    which the node checkpoints (the lulls of a VM's I/O; most crashes then find the bitmaps
    consistent). ``threshold_bits``: newly dirtied granules since the last checkpoint that force
    one right after the write that crossed it (the seed's "64 KiB of changed bits").
    """

    interval: float | None = 5.0
    idle: float | None = 0.5
    threshold_bits: int | None = 64 * 1024 * 8

    def __post_init__(self) -> None:
        for name in ("interval", "idle"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"checkpoint {name} must be > 0 seconds or None, not {value}")
        if self.threshold_bits is not None and self.threshold_bits < 1:
            raise ValueError(f"checkpoint threshold must be >= 1 bit or None, not "
                             f"{self.threshold_bits}")

    @property
    def timed(self) -> bool:
        return self.interval is not None or self.idle is not None

    @classmethod
    def parse(cls, text: str) -> CheckpointPolicy:
        """``interval=5,idle=0.5,threshold=524288`` (``off`` disables one; ``none`` all timers)."""
        if text.strip() in ("none", "off"):
            return cls(interval=None, idle=None, threshold_bits=None)
        values: dict[str, float | int | None] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or key not in ("interval", "idle", "threshold"):
                raise ValueError(f"bad checkpoint setting '{item}' (interval=S, idle=S, "
                                 "threshold=BITS, each may be 'off')")
            field = "threshold_bits" if key == "threshold" else key
            try:
                values[field] = None if raw == "off" else (
                    int(raw) if key == "threshold" else float(raw))
            except ValueError:
                raise ValueError(f"bad checkpoint setting '{item}'") from None
        return cls(**values)  # type: ignore[arg-type]


class CheckpointTimer:
    """A daemon thread that calls ``due()`` and, when it returns True, ``run()``.

    ``due``/``run`` are the node's; the node serializes them with its own lock. An exception
    from ``run`` is kept for the node to raise at its next request, so a failed background
    checkpoint never goes unreported (the bitmaps stay in_use; the timer retries later).
    """

    def __init__(self, policy: CheckpointPolicy, due: Callable[[float], float | None],
                 run: Callable[[], None]) -> None:
        self._policy = policy
        self._due = due
        self._run = run
        self._stop = threading.Event()
        self.error: BaseException | None = None
        step = [v for v in (policy.interval, policy.idle) if v is not None]
        self._tick = max(0.01, min(step) / 2) if step else 1.0
        self._thread = threading.Thread(target=self._loop, name="dirtybits-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        wait = self._tick
        while not self._stop.wait(wait):
            try:
                left = self._due(time.monotonic())
                if left is not None and left <= 0:
                    self._run()
                    wait = self._tick
                else:
                    wait = self._tick if left is None else min(self._tick, left)
            except Exception as exc:  # kept for the node's next request; retried later
                self.error = exc
                wait = max(1.0, self._tick)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
