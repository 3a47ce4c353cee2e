"""The seed's ``--drive`` and ``--dirty-bitmap`` options, applied to the daemon's graph.

The options are parsed and cross-checked without I/O (``services.serve_options``); this
module opens the drives and binds their bitmaps, on the block thread, with the seed's rules:

* a drive's own bitmaps load with it (``bitmap=auto``) or none do (``bitmap=no``: explicit,
  and then no ``--dirty-bitmap`` may name the drive);
* ``--dirty-bitmap name=B,drive=D`` binds bitmap B: from D's own image, or with ``file=`` /
  ``file_id=`` from a container (a raw drive's bitmaps, many drives in one file);
* a bitmap that is not there is an error unless ``create=on``; ``create=on`` makes it when it
  is missing (and loads it when a restart finds it made), with ``granularity`` if given;
* names are unique per container file: a bitmap created for one drive is refused when the
  container already holds that name for another drive, at creation, not later when stored;
* the drive's size must match what the container recorded for it (checked at open);
* ``enabled=on|off`` sets whether it records; ``auto=on|off`` whether it records after the
  next open (the stored ``auto`` flag, which in QEMU's format is the same thing: both may be
  given only when they agree).

Everything opened is closed again when an option fails, so start-up leaves nothing open.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from dirtybits.block.graph import BlockGraph, GraphError
from dirtybits.errors import DirtybitsError, UsageError

if TYPE_CHECKING:
    from dirtybits.services.serve_options import DirtyBitmapOption, DriveOption, ServeOptions

log = logging.getLogger(__name__)


def open_drives(graph: BlockGraph, options: ServeOptions) -> None:
    """Open every drive and bind every bitmap, or raise and leave the graph as it was."""
    opened: list[str] = []
    try:
        for d in options.drives:
            _open_drive(graph, d, options)
            opened.append(d.id)
        for b in options.bitmaps:
            _bind(graph, b, options.container_path(b))
    except BaseException:
        for name in reversed(opened):  # the first error is the one to report
            graph.devices.pop(name, None)
            gn = graph.nodes.get(name)
            if gn is not None:
                gn.parents.pop(f"device {name}", None)
                try:
                    graph.delete(name)
                except DirtybitsError as exc:
                    log.error("closing drive %s after a failed start: %s", name, exc)
        raise


def _open_drive(graph: BlockGraph, d: DriveOption, options: ServeOptions) -> None:
    from dirtybits.block.open import probe_format

    fmt: str | None = d.format
    if fmt is None:
        try:
            fmt = probe_format(d.file, writable=not d.read_only)
        except OSError as exc:
            raise GraphError(f"Could not open '{d.file}': {exc.strerror}") from None
    mine = options.bitmaps_of(d.id)
    if d.bitmap == "no" and mine:
        raise UsageError(f"--drive id={d.id} has bitmap=no (load none of its bitmaps), but "
                         f"{mine[0].label} binds one to it")
    paths = {os.path.realpath(p): p for b in mine
             if (p := options.container_path(b)) is not None}
    if d.bitmap_file is not None:
        paths.setdefault(os.path.realpath(d.bitmap_file), d.bitmap_file)
    if len(paths) > 1:
        raise UsageError(f"--drive id={d.id}: its bitmaps are in several files "
                         f"({', '.join(sorted(paths.values()))}); a raw drive keeps them in "
                         "one")
    container = next(iter(paths.values()), None)
    if container is not None:
        if fmt != "raw":
            raise UsageError(f"--drive id={d.id} is {fmt}: its bitmaps live in its own image; "
                             "file=, file_id= and bitmap-file= name a container for raw "
                             "drives")
        from dirtybits.block.container import ensure_drive

        ensure_drive(container, d.file, d.id, create=any(b.create for b in mine))
    opts: dict[str, object] = {
        "driver": fmt, "node-name": d.id, "read-only": d.read_only,
        "file": {"driver": "file", "filename": d.file, "read-only": d.read_only},
    }
    if d.cache in ("none", "directsync"):
        opts["cache"] = {"direct": True}
    elif d.cache == "unsafe":
        opts["cache"] = {"no-flush": True}
    graph.add(opts, bitmaps=d.bitmap, bitmap_file=container)
    graph.add_device(d.id, d.id)
    log.info("drive %s: %s (%s)%s", d.id, d.file, fmt,
             f", bitmaps in {container}" if container else "")


def _bind(graph: BlockGraph, b: DirtyBitmapOption, container: str | None) -> None:
    if b.drive not in graph.devices:
        raise UsageError(f"{b.label}: drive={b.drive} names no --drive")
    node = graph.open_node(graph.nodes[graph.devices[b.drive]])
    reg = node.bitmaps
    where = container or node.path
    if b.auto is not None and b.enabled is not None and b.auto != b.enabled:
        raise UsageError(f"{b.label}: enabled and auto disagree; a stored "
                         "bitmap records after the next open exactly when it records now")
    enabled = b.enabled if b.enabled is not None else b.auto
    found = reg.find(b.name)
    if found is None:
        if not b.create:
            raise UsageError(f"{b.label}: no bitmap "
                             f"'{b.name}' in {where} (create=on makes it)")
        persistent = b.persistent is not False
        if container is not None and persistent:
            _unique_in_container(node, b)
        reg.add(b.name, b.granularity, persistent=persistent, disabled=enabled is False)
        log.info("drive %s: created bitmap '%s' in %s", b.drive, b.name, where)
        return
    info = reg.info(b.name)
    if b.persistent is False:
        raise UsageError(f"{b.label}: persistent=off, but the bitmap is stored in {where}")
    if b.granularity is not None and b.granularity != info.granularity:
        raise UsageError(f"{b.label}: granularity={b.granularity} but the "
                         f"stored bitmap has {info.granularity} (granularity is only for "
                         "creating)")
    if not info.persistent:  # pragma: no cover - bitmaps found at open are stored ones
        raise GraphError(f"bitmap '{b.name}' is not stored in {where}")
    if enabled is not None and enabled != info.recording and not info.inconsistent:
        if enabled:
            reg.enable(b.name)
        else:
            reg.disable(b.name)
    log.info("drive %s: bound bitmap '%s' from %s (%s)", b.drive, b.name, where,
             info.disk_state.value)


def _unique_in_container(node: object, b: DirtyBitmapOption) -> None:
    """Names are unique per container file (the seed's rule), whichever drive holds them."""
    from dirtybits.block.container import split_name

    container = getattr(node, "container", None)
    if container is None:  # pragma: no cover - raw drives with file= are DriveNodes
        return
    mine = getattr(node, "drive_id", b.drive)
    for sb in container.store.bitmaps:
        parts = split_name(sb.name)
        if parts is not None and parts[1] == b.name and parts[0] != mine:
            raise UsageError(f"{b.label}: "
                             f"{container.path} already holds a bitmap '{b.name}' (for drive "
                             f"'{parts[0]}'); names are unique per bitmap file")


__all__ = ["open_drives"]
