"""``blockdev-add``'s arguments (QAPI ``BlockdevOptions``) for the drivers dirtybits serves.

The schema is QEMU 7.2's (``qapi/block-core.json``, checked against ``query-qmp-schema`` of
``qemu-system-x86_64`` 7.2), cut down to what ``dirtybits serve`` can honour or ignore
without harm, members kept in QEMU's order so the first error is QEMU's:

- base members (``BlockdevOptionsBase``): ``driver``, ``node-name``, ``discard``
  (ignore/unmap), ``cache`` (``direct``, ``no-flush``), ``read-only``, ``auto-read-only``,
  ``force-share``, ``detect-zeroes`` (off/on/unmap);
- ``file``: ``filename``, ``locking`` (auto/on/off), ``aio`` (threads/native/io_uring),
  ``aio-max-batch``, ``drop-cache``, ``x-check-cache-dropped`` (left out: ``pr-manager``);
- ``raw``: ``file`` (``BlockdevRef``: a node name or inline options), ``offset``, ``size``;
- ``qcow2``: ``file``, ``backing`` (``BlockdevRefOrNull``: null means no backing file),
  ``lazy-refcounts``, ``pass-discard-request``/``-snapshot``/``-other``, ``overlap-check``,
  ``cache-size``, ``l2-cache-size``, ``l2-cache-entry-size``, ``refcount-cache-size``,
  ``cache-clean-interval``, ``data-file`` (left out: ``encrypt``).

A member left out is refused as QEMU refuses a member it does not know (``Parameter
'encrypt' is unexpected``). A driver QEMU knows but dirtybits does not serve (``nbd``,
``luks``, ``vmdk``, ...) is refused as QEMU refuses a driver it does not know: ``Parameter
'driver' does not accept value 'nbd'``, the text a QEMU built without that driver prints
(its ``BlockdevDriver`` enum then lacks the value), so a client that probes for drivers
reads the answer it already understands.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dirtybits.proto.qmp.core import QmpError
from dirtybits.proto.qmp.schema import (
    BOOL,
    INT,
    STR,
    Alternate,
    Enum,
    Member,
    Struct,
    Union,
    check,
)

DRIVERS = ("file", "qcow2", "raw")  # in BlockdevDriver's order

BLOCKDEV_DRIVER = Enum("BlockdevDriver", DRIVERS)
BLOCKDEV_DISCARD_OPTIONS = Enum("BlockdevDiscardOptions", ("ignore", "unmap"))
BLOCKDEV_DETECT_ZEROES_OPTIONS = Enum("BlockdevDetectZeroesOptions", ("off", "on", "unmap"))
ON_OFF_AUTO = Enum("OnOffAuto", ("auto", "on", "off"))
BLOCKDEV_AIO_OPTIONS = Enum("BlockdevAioOptions", ("threads", "native", "io_uring"))
QCOW2_OVERLAP_CHECK_MODE = Enum("Qcow2OverlapCheckMode", ("none", "constant", "cached", "all"))

BLOCKDEV_CACHE_OPTIONS = Struct("BlockdevCacheOptions", (
    Member("direct", BOOL, True),
    Member("no-flush", BOOL, True),
))

_VARIANTS: dict[str, Struct] = {}

BLOCKDEV_OPTIONS = Union("BlockdevOptions", (
    Member("driver", BLOCKDEV_DRIVER),
    Member("node-name", STR, True),
    Member("discard", BLOCKDEV_DISCARD_OPTIONS, True),
    Member("cache", BLOCKDEV_CACHE_OPTIONS, True),
    Member("read-only", BOOL, True),
    Member("auto-read-only", BOOL, True),
    Member("force-share", BOOL, True),
    Member("detect-zeroes", BLOCKDEV_DETECT_ZEROES_OPTIONS, True),
), "driver", _VARIANTS)

BLOCKDEV_REF = Alternate("BlockdevRef", BLOCKDEV_OPTIONS)
BLOCKDEV_REF_OR_NULL = Alternate("BlockdevRefOrNull", BLOCKDEV_OPTIONS, null=True)

QCOW2_OVERLAP_CHECK_FLAGS = Struct("Qcow2OverlapCheckFlags", (
    Member("template", QCOW2_OVERLAP_CHECK_MODE, True),
    *(Member(name, BOOL, True) for name in (
        "main-header", "active-l1", "active-l2", "refcount-table", "refcount-block",
        "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory")),
))
QCOW2_OVERLAP_CHECKS = Alternate("Qcow2OverlapChecks", QCOW2_OVERLAP_CHECK_FLAGS,
                                 QCOW2_OVERLAP_CHECK_MODE)

BLOCKDEV_OPTIONS_FILE = Struct("BlockdevOptionsFile", (
    Member("filename", STR),
    Member("locking", ON_OFF_AUTO, True),
    Member("aio", BLOCKDEV_AIO_OPTIONS, True),
    Member("aio-max-batch", INT, True),
    Member("drop-cache", BOOL, True),
    Member("x-check-cache-dropped", BOOL, True),
))
BLOCKDEV_OPTIONS_RAW = Struct("BlockdevOptionsRaw", (
    Member("file", BLOCKDEV_REF),
    Member("offset", INT, True),
    Member("size", INT, True),
))
BLOCKDEV_OPTIONS_QCOW2 = Struct("BlockdevOptionsQcow2", (
    Member("file", BLOCKDEV_REF),
    Member("backing", BLOCKDEV_REF_OR_NULL, True),
    Member("lazy-refcounts", BOOL, True),
    Member("pass-discard-request", BOOL, True),
    Member("pass-discard-snapshot", BOOL, True),
    Member("pass-discard-other", BOOL, True),
    Member("overlap-check", QCOW2_OVERLAP_CHECKS, True),
    Member("cache-size", INT, True),
    Member("l2-cache-size", INT, True),
    Member("l2-cache-entry-size", INT, True),
    Member("refcount-cache-size", INT, True),
    Member("cache-clean-interval", INT, True),
    Member("data-file", BLOCKDEV_REF, True),
))
_VARIANTS.update(file=BLOCKDEV_OPTIONS_FILE, raw=BLOCKDEV_OPTIONS_RAW,
                 qcow2=BLOCKDEV_OPTIONS_QCOW2)


def blockdev_options(obj: Mapping[str, Any], *, keyval: bool = False,
                     root: bool = True) -> dict[str, Any]:
    """``obj`` checked as ``blockdev-add`` checks its arguments: nested dicts of typed values
    (a ``BlockdevRef`` is a node-name string or a dict; ``backing`` may be None; in keyval
    form ``backing=`` is the empty string, which QEMU takes, deprecated, as no backing).

    ``keyval``: ``obj`` comes from ``dirtybits.proto.keyval.parse`` (all scalars strings).
    ``root``: the options are a new root node, which must have a ``node-name`` (QEMU checks
    this right after the schema, for ``blockdev-add`` and ``--blockdev`` alike).
    Raises ``QmpError`` with QEMU's text for the first problem."""
    options = check(obj, BLOCKDEV_OPTIONS, keyval=keyval)
    if root and "node-name" not in options:
        raise QmpError("'node-name' must be specified for the root node")
    return options


__all__ = ["BLOCKDEV_OPTIONS", "BLOCKDEV_REF", "BLOCKDEV_REF_OR_NULL", "DRIVERS",
           "blockdev_options"]
