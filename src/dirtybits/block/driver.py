"""The interface every image driver (raw, qcow2) offers to the layers above.

Offsets and lengths are guest bytes. Drivers raise ``DirtybitsError`` subclasses only.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, runtime_checkable

from dirtybits.filelock import FileLock
from dirtybits.qcow2.extent import MapExtent

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class ImageDriver(Protocol):
    format_name: str  # "qcow2" or "raw"
    path: str
    readonly: bool

    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: Buffer, *, compress: bool = False) -> None:
        """``compress``: store whole clusters compressed (qcow2 only; others raise
        ``UnsupportedFeatureError``, qemu's ENOTSUP)."""
        ...

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def resize(self, new_size: int) -> None: ...

    def block_status(self, offset: int, length: int) -> Iterable[MapExtent]: ...

    def locks(self) -> list[FileLock]:
        """The image-locking descriptions this driver holds (released on inactivation)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> ImageDriver: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
