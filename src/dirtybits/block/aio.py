"""The asyncio facade: how services (QMP, NBD, jobs) reach the block layer.

Every call runs on the block thread (``BlockOwner.submit``) and its result comes back to the
event loop, so a slow request never blocks the loop and nothing in the block layer is touched
from two threads. Results must be plain data: an iterator or generator (over live L2 tables or
bitmap words) would be consumed later on the loop's thread, outside the owner, so it is refused
(``LazyResultError``). Node events are delivered on the loop (``events``).

    layer = AsyncBlockLayer()
    node = await layer.open("disk.qcow2")
    await layer.call(node.write, 0, b"x" * 4096)
    info = await layer.call(node.bitmaps.info, "b0")
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dirtybits.block.node import BlockNode, NodeEvent
from dirtybits.block.owner import BlockOwner, default_owner
from dirtybits.errors import DirtybitsError

log = logging.getLogger(__name__)

T = TypeVar("T")


class LazyResultError(DirtybitsError, TypeError):
    """A call through the facade returned something lazy (an iterator or generator)."""


def _checked(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    result = fn(*args, **kwargs)
    if inspect.isgenerator(result) or (isinstance(result, Iterator)
                                       and not isinstance(result, (bytes, bytearray, str))):
        close = getattr(result, "close", None)
        if callable(close):
            close()
        raise LazyResultError(
            f"{getattr(fn, '__qualname__', fn)!r} returned a lazy {type(result).__name__}: "
            "only plain data crosses the block thread (return a list)")
    return result


class AsyncBlockLayer:
    """The block layer as seen from an event loop."""

    def __init__(self, owner: BlockOwner | None = None) -> None:
        self.owner = owner if owner is not None else default_owner()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the block thread and return its (plain) result;
        its exception is raised here. Raises ``LazyResultError`` for a lazy result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

        self.owner.post(lambda: _checked(fn, args, kwargs),
                        lambda ok, value: loop.call_soon_threadsafe(settle, ok, value))
        return await fut

    async def open(self, path: str, fmt: str | None = None, **options: Any) -> BlockNode:
        """``dirtybits.open`` on the block thread; the node belongs to this layer's owner."""
        from dirtybits.block.open import open_node

        return await self.call(open_node, path, fmt, owner=self.owner, **options)

    async def close(self, node: BlockNode) -> None:
        await self.call(node.close)

    def events(self, node: BlockNode, maxsize: int = 0) -> asyncio.Queue[NodeEvent]:
        """A queue that receives ``node``'s events on the current event loop."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[NodeEvent] = asyncio.Queue(maxsize)

        def deliver(event: NodeEvent) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, event)
            except RuntimeError:  # the loop closed: nobody is listening any more
                log.debug("event %s dropped: loop closed", event.kind)

        self.owner.call(node.subscribe, deliver)
        return q


__all__ = ["AsyncBlockLayer", "LazyResultError"]
