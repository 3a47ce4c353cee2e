"""One error tree for the whole package.

Every failure a user can cause (a malformed image, a bad request, an I/O error) surfaces as a
``DirtybitsError`` subclass that says what was wrong and where, so the CLI can print one clear
line and programs can catch one root.
"""

from __future__ import annotations


class DirtybitsError(Exception):
    """Root of every error dirtybits raises on purpose."""


class FormatError(DirtybitsError):
    """An on-disk record does not satisfy the format's rules.

    ``structure`` names the record (``"qcow2 header"``, ``"L2 table"``), ``offset`` the byte
    offset in the file where it was read, when known.
    """

    def __init__(self, message: str, *, structure: str | None = None, offset: int | None = None):
        parts = []
        if structure:
            parts.append(structure)
        if offset is not None:
            parts.append(f"at offset {offset:#x}")
        prefix = " ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.structure = structure
        self.offset = offset
        self.reason = message


class ImageError(DirtybitsError):
    """The image engine cannot do what was asked (unsupported feature, corrupt image, ...)."""


class UnsupportedFeatureError(ImageError):
    """The image uses a feature this engine will not touch (or will only read)."""


class CorruptImageError(ImageError):
    """The image's metadata is inconsistent; writing would make it worse.

    ``reason`` is the finding alone (QEMU's event text), ``offset``/``size`` the host range
    of a refused write, when there was one."""

    def __init__(self, *args: object, reason: str | None = None, offset: int | None = None,
                 size: int | None = None) -> None:
        super().__init__(*args)
        self.reason = reason if reason is not None else (str(args[0]) if args else "")
        self.offset = offset
        self.size = size


class ReadOnlyError(ImageError):
    """A write was attempted on an image opened read-only."""


class ImageIOError(ImageError):
    """An operating-system I/O error while reading or writing an image file."""

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class LockError(ImageError):
    """Another process holds a conflicting lock on the image. ``hint`` is the line a
    command line adds (QEMU keeps hints out of QMP errors); ``reason`` the text without it."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(f"{reason}\n{hint}" if hint else reason)
        self.reason = reason
        self.hint = hint


class UsageError(DirtybitsError):
    """A command line or request is malformed."""
