"""The block thread: the one owner of every node opened under it.

Nodes, their engines and their bitmaps are synchronous and touched by nothing but their
owner, so they need no locks of their own (QEMU's main AioContext). The owner is a thread
with a queue: services submit calls to it (``submit``, or ``dirtybits.block.aio`` from
asyncio), and between calls it runs what is due on its nodes (timed checkpoints), so there
is no timer thread per node. A synchronous caller (the CLI, a script using
``dirtybits.open()``) borrows ownership for the length of one call by taking the owner's
lock (``BlockOwner.lock``); the thread takes the same lock for everything it runs, so at any
moment exactly one thread is inside the block layer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_TICK = 1.0  # seconds the thread sleeps when nothing is due (a new node wakes it)


class Scheduled(Protocol):
    """What the owner asks of a node between calls: a pure "when is the next checkpoint due"
    and "run what is due now"."""

    def next_due(self, now: float) -> float | None: ...

    def run_due(self, now: float) -> None: ...


class BlockOwner:
    """One block thread and its lock. ``submit`` runs a call on the thread; ``lock`` lets
    a synchronous caller run one inline instead."""

    def __init__(self, name: str = "dirtybits-block") -> None:
        self.name = name
        self.lock = threading.RLock()
        self._nodes: weakref.WeakSet[Any] = weakref.WeakSet()
        self._queue: queue.Queue[tuple[Callable[[], Any], Callable[[bool, Any], object]] | None] = (
            queue.Queue())
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = False

    # ------------------------------------------------------------------ the thread
    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopped = False
                self._thread = threading.Thread(target=self._loop, name=self.name,
                                                daemon=True)
                self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the block thread; its result or error lands in the
        returned future."""
        fut: Future[T] = Future()

        def done(ok: bool, value: Any) -> None:
            if fut.set_running_or_notify_cancel():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

        self.post(lambda: fn(*args, **kwargs), done)
        return fut

    def post(self, fn: Callable[[], Any], done: Callable[[bool, Any], object]) -> None:
        """Run ``fn()`` on the block thread, then ``done(True, result)`` or
        ``done(False, exception)`` there (the cheapest hand-off: no future on this side)."""
        self._ensure_thread()
        self._queue.put((fn, done))

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` as the owner: inline under the lock (the caller's thread borrows
        ownership), or directly when already on the block thread."""
        with self.lock:
            return fn(*args, **kwargs)

    def adopt(self, node: Scheduled) -> None:
        """Schedule ``node``'s timed work on this thread (started on first use)."""
        self._nodes.add(node)
        self._ensure_thread()
        self._queue.put(None)  # wake: the new node may be due sooner

    def release(self, node: Scheduled) -> None:
        self._nodes.discard(node)

    def wake(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def _next_wait(self) -> float:
        now = time.monotonic()
        waits = [w for node in list(self._nodes) if (w := node.next_due(now)) is not None]
        return max(0.0, min(waits)) if waits else IDLE_TICK

    def _loop(self) -> None:
        while not self._stopped:
            try:
                item = self._queue.get(timeout=self._next_wait())
            except queue.Empty:
                item = None
            if item is not None:
                fn, done = item
                try:
                    with self.lock:
                        result = fn()
                except BaseException as exc:
                    outcome: tuple[bool, Any] = (False, exc)
                else:
                    outcome = (True, result)
                try:
                    done(*outcome)
                except Exception:  # e.g. the caller's event loop closed: nobody waits
                    log.debug("%s: a result was not delivered", self.name, exc_info=True)
                if not self._queue.empty():
                    continue  # more calls waiting: what is due runs in the next lull
            self._run_due()

    def _run_due(self) -> None:
        now = time.monotonic()
        for node in list(self._nodes):
            due = node.next_due(now)
            if due is not None and due <= 0:
                with self.lock:
                    node.run_due(time.monotonic())

    def stop(self) -> None:
        """Stop the thread after the calls already queued (nodes stay usable inline)."""
        self._stopped = True
        self._queue.put(None)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self._thread = None


_default: BlockOwner | None = None
_default_lock = threading.Lock()


def default_owner() -> BlockOwner:
    """The process's block thread, for nodes opened without one."""
    global _default
    with _default_lock:
        if _default is None:
            _default = BlockOwner()
        return _default


__all__ = ["BlockOwner", "Scheduled", "default_owner"]
