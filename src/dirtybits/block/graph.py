"""The daemon's graph of named block nodes, as QEMU's ``blockdev-add`` builds one.

QEMU stacks a format node (``qcow2``, ``raw``) on a protocol node (``file``). dirtybits keeps
that shape for what clients see (``query-named-block-nodes`` lists both, with QEMU's keys) but
opens images the way its engine does: a ``file`` node is a checked name for a path, opened by
itself only while no format node stands on it (then as a raw node, for ``qemu-io`` and
bitmaps); a format node opens its file's path as one ``BlockNode`` with the node's name, its
``backing`` and ``data-file`` children handed in when they are nodes of the graph.

Devices (``--drive id=ID``, QEMU's ``-drive``) are named backends over a node: bitmap
commands accept the device name where QEMU does, and ``query-block`` lists them.

Synchronous: the graph belongs to the block thread; services call it through the facade.
Errors are ``GraphError`` with QEMU's texts where QEMU has the same case.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dirtybits.block.driver import ImageDriver
from dirtybits.block.node import BlockNode, NodeEvent
from dirtybits.block.owner import BlockOwner
from dirtybits.block.registry import DiskState
from dirtybits.errors import DirtybitsError

log = logging.getLogger(__name__)

_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU's id_wellformed
MAX_NODE_NAME = 31  # bytes (QEMU's node_name[32], NUL included)
_auto_names = itertools.count(1)


class GraphError(DirtybitsError):
    """A graph operation refused (QEMU's text where QEMU has the case)."""


@dataclass
class GraphNode:
    """One named node: its driver, options, children, parents and (format nodes) the open
    ``BlockNode``."""

    name: str
    driver: str  # "file", "raw", "qcow2"
    path: str  # the file's name, as given
    readonly: bool
    cache: str  # dirtybits' cache mode, from cache.direct / cache.no-flush
    direct: bool
    no_flush: bool
    detect_zeroes: str
    discard: str
    implicit: bool  # made for an inline child: deleted with its parent
    children: dict[str, str] = field(default_factory=dict)  # role -> node name
    parents: dict[str, str] = field(default_factory=dict)  # node or "device ID" -> role
    node: BlockNode | None = None
    data_file: Any = None  # an open DataFile handed to the engine (closed by the graph)
    extra: dict[str, Any] = field(default_factory=dict)


def _cache_mode(direct: bool, no_flush: bool) -> str:
    if direct and no_flush:
        raise GraphError("cache.direct=on together with cache.no-flush=on is not supported "
                         "by dirtybits: pick one")
    return "none" if direct else "unsafe" if no_flush else "writeback"


def _open_error(path: str, exc: OSError) -> GraphError:
    return GraphError(f"Could not open '{path}': {os.strerror(exc.errno or 0)}")


class BlockGraph:
    """Named nodes and devices; every method runs on the block thread."""

    def __init__(self, owner: BlockOwner, *,
                 on_event: Callable[[NodeEvent], None] | None = None) -> None:
        self.owner = owner
        self.nodes: dict[str, GraphNode] = {}
        self.devices: dict[str, str] = {}  # device id -> node name
        self.on_event = on_event

    # ------------------------------------------------------------------ lookups
    def lookup(self, name: str) -> GraphNode:
        """A node by device or node name (QEMU's ``bdrv_lookup_bs``)."""
        node_name = self.devices.get(name, name)
        found = self.nodes.get(node_name)
        if found is None:
            raise GraphError(f"Cannot find device='{name}' nor node-name='{name}'")
        return found

    def bitmap_node(self, name: str) -> BlockNode:
        """The open node whose registry holds the bitmaps of ``name`` (device or node),
        as QEMU's ``block_dirty_bitmap_lookup`` finds it ("Node 'x' not found")."""
        node_name = self.devices.get(name, name)
        gn = self.nodes.get(node_name)
        if gn is None:
            raise GraphError(f"Node '{name}' not found")
        return self.open_node(gn)

    def open_node(self, gn: GraphNode) -> BlockNode:
        """The ``BlockNode`` that serves ``gn``: a format node's own, or a file node opened
        as raw while nothing stands on it."""
        if gn.node is not None:
            return gn.node
        if gn.driver != "file":  # pragma: no cover - format nodes are opened when added
            raise GraphError(f"node '{gn.name}' is not open")
        users = [p for p in gn.parents if not p.startswith("device ")]
        if users:
            raise GraphError(
                f"Node '{gn.name}' is the protocol node under '{users[0]}': dirtybits keeps "
                f"bitmaps and takes I/O on the format node; use '{users[0]}'")
        from dirtybits.block.open import open_node

        gn.node = open_node(gn.path, "raw", readonly=gn.readonly, cache=gn.cache,
                            owner=self.owner, force_share=gn.extra.get("force-share", False),
                            node_name=gn.name)
        self._watch(gn.node)
        return gn.node

    def _watch(self, node: BlockNode) -> None:
        if self.on_event is not None:
            node.subscribe(self.on_event)

    # ------------------------------------------------------------------ blockdev-add
    def add(self, opts: dict[str, Any], *, implicit: bool = False, bitmaps: str = "auto",
            bitmap_file: str | None = None) -> str:
        """``blockdev-add`` with checked ``BlockdevOptions``; returns the node's name.
        ``bitmaps="no"`` loads none of the image's bitmaps (``--drive bitmap=no``);
        ``bitmap_file``: a raw node's bitmaps live in that container (``--drive``).
        Raises ``GraphError`` and what opening the image raises; nothing is left behind."""
        name = opts.get("node-name")
        if name is None:
            if not implicit:
                raise GraphError("'node-name' must be specified for the root node")
            name = f"#block{next(_auto_names):03d}"
            while name in self.nodes:
                name = f"#block{next(_auto_names):03d}"
        elif not _NODE_NAME.match(name):
            raise GraphError(f"Invalid node-name: '{name}'")
        if name in self.devices:
            raise GraphError(f"node-name={name} is conflicting with a device id")
        if name in self.nodes:
            raise GraphError(f"Duplicate nodes with node-name='{name}'")
        if len(name.encode()) > MAX_NODE_NAME:
            raise GraphError("Node name too long")
        driver = opts["driver"]
        cache = opts.get("cache", {})
        direct, no_flush = bool(cache.get("direct", False)), bool(cache.get("no-flush", False))
        readonly = bool(opts.get("read-only", False))
        force_share = bool(opts.get("force-share", False))
        if force_share and not readonly:
            raise GraphError("force-share=on can only be used with read-only images")
        dz = opts.get("detect-zeroes", "off")
        if dz != "off":
            raise GraphError(f"detect-zeroes={dz} is not supported by dirtybits (only off)")
        gn = GraphNode(name, driver, "", readonly, _cache_mode(direct, no_flush), direct,
                       no_flush, dz, opts.get("discard", "ignore"), implicit)
        gn.extra["force-share"] = force_share
        if driver == "file":
            gn.path = opts["filename"]
            self._check_file(gn.path, readonly)
            self.nodes = {name: gn, **self.nodes}  # the newest first, as QEMU lists them
            log.info("blockdev-add %s: file %s", name, gn.path)
            return name
        made: list[str] = []  # implicit children made here, removed if the open fails
        try:
            file_name = self._child(opts["file"], made, readonly,
                                    {"direct": direct, "no-flush": no_flush})
            fgn = self.nodes[file_name]
            if fgn.driver != "file":
                raise GraphError(f"the 'file' child of '{name}' must be a 'file' node, not "
                                 f"'{fgn.driver}' (dirtybits stacks formats on files only)")
            self._take_file(fgn, name)
            gn.path = fgn.path
            gn.children["file"] = file_name
            self._open_format(gn, opts, made, bitmaps, bitmap_file)
        except BaseException:
            for child in reversed(made):
                self._drop(child)
            for child in gn.children.values():
                cg = self.nodes.get(child)
                if cg is not None:
                    cg.parents.pop(name, None)
            if gn.data_file is not None:
                gn.data_file.close()
            raise
        # listed as QEMU lists them: the newest first, a node before the children made for it
        order = [n for n in self.nodes if n not in made]
        self.nodes[name] = gn
        self.nodes = {n: self.nodes[n] for n in (name, *made, *order)}
        for child in gn.children.values():
            self.nodes[child].parents[name] = "child"
        log.info("blockdev-add %s: %s over %s", name, driver, gn.path)
        return name

    def _check_file(self, path: str, readonly: bool) -> None:
        try:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as exc:
            raise _open_error(path, exc) from None
        os.close(fd)
        if os.path.isdir(path):
            raise GraphError(f"'{path}' is not a regular file or block device")

    def _child(self, ref: str | dict[str, Any], made: list[str], readonly: bool,
               inherit: dict[str, Any] | None = None) -> str:
        """A child reference (a node name, or inline options added as an implicit node)."""
        if isinstance(ref, str):
            self.lookup(ref)
            return self.devices.get(ref, ref)
        opts = dict(ref)
        if readonly and "read-only" not in opts:
            opts["read-only"] = True
        if inherit is not None:  # QEMU's bdrv_inherited_options: the parent's cache
            opts["cache"] = {**inherit, **opts.get("cache", {})}
        child = self.add(opts, implicit=True)
        if "node-name" not in ref:
            self.nodes[child].implicit = True
        made.append(child)
        return child

    def _take_file(self, fgn: GraphNode, parent: str) -> None:
        users = [p for p in fgn.parents if not p.startswith("device ")]
        if users:
            raise GraphError(f"Node '{fgn.name}' is already the file of '{users[0]}': two "
                             "format nodes cannot share one file")
        if fgn.node is not None:
            if fgn.node.bitmaps.names():
                raise GraphError(f"Node '{fgn.name}' has dirty bitmaps of its own: remove "
                                 "them before stacking a format node on it")
            fgn.node.close()
            fgn.node = None

    def _open_format(self, gn: GraphNode, opts: dict[str, Any], made: list[str],
                     bitmaps: str, bitmap_file: str | None) -> None:
        from dirtybits.block.open import open_image, open_node, probe_format

        ro, fs = gn.readonly, bool(gn.extra["force-share"])
        node: BlockNode | ImageDriver
        if bitmap_file is not None and gn.driver != "raw":
            raise GraphError(f"'{gn.name}' is {gn.driver}: it keeps its bitmaps in its own "
                             "image; a bitmap container is for raw drives")
        if gn.driver == "raw":
            for key in ("offset", "size"):
                if key in opts:
                    raise GraphError(f"raw '{key}' is not supported by dirtybits")
            if bitmap_file is not None:
                node = open_node(gn.path, "raw", readonly=ro, cache=gn.cache, owner=self.owner,
                                 bitmap_file=bitmap_file, bitmaps=bitmaps, node_name=gn.name)
                gn.extra["bitmap-file"] = bitmap_file
            else:
                node = open_image(gn.path, "raw", readonly=ro, cache=gn.cache,
                                  always_node=True, force_share=fs, owner=self.owner,
                                  node_name=gn.name)
        else:
            try:
                fmt = probe_format(gn.path, writable=not ro)
            except OSError as exc:
                raise _open_error(gn.path, exc) from None
            if fmt != "qcow2":
                raise GraphError("Image is not in qcow2 format")
            backing = None
            open_backing = True
            if "backing" in opts:
                open_backing = False
                if opts["backing"] is not None:
                    bname = self._child(opts["backing"], made, True)
                    bgn = self.nodes[bname]
                    backing = self.open_node(bgn)
                    gn.children["backing"] = bname
            if "data-file" in opts:
                dname = self._child(opts["data-file"], made, ro)
                dgn = self.nodes[dname]
                if dgn.driver != "file":
                    raise GraphError(f"the data-file of '{gn.name}' must be a 'file' node")
                self._take_file(dgn, gn.name)
                from dirtybits.block.children import open_data_file

                gn.data_file = open_data_file(dgn.path, readonly=ro, force_share=fs)
                gn.children["data-file"] = dname
            node = open_image(gn.path, "qcow2", readonly=ro, cache=gn.cache, always_node=True,
                              force_share=fs, owner=self.owner, backing=backing,  # type: ignore[arg-type]
                              data_file=gn.data_file, open_backing=open_backing,
                              node_name=gn.name, bitmaps=bitmaps)
        assert isinstance(node, BlockNode)
        node.unmap = gn.discard == "unmap"
        gn.node = node
        self._watch(node)

    # ------------------------------------------------------------------ blockdev-del
    def delete(self, name: str) -> None:
        """``blockdev-del``: only a node nothing uses, that was added by name."""
        gn = self.nodes.get(name)
        if gn is None:
            raise GraphError(f"Failed to find node with node-name='{name}'")
        if gn.implicit:
            raise GraphError(f"Node {name} is not owned by the monitor")
        if any(p.startswith("device ") for p in gn.parents) or gn.extra.get("exports"):
            raise GraphError(f"Node {name} is in use")
        if gn.parents:
            raise GraphError(f"Block device {name} is in use")
        if gn.node is not None:
            for info in gn.node.bitmaps.query():
                if info.busy:
                    raise GraphError(f"Node {name} is in use")
        self._drop(name)

    def _drop(self, name: str) -> None:
        gn = self.nodes.pop(name)
        try:
            if gn.node is not None:
                gn.node.close()
                gn.node = None
        finally:
            if gn.data_file is not None:
                gn.data_file.close()
            for child in gn.children.values():
                cg = self.nodes.get(child)
                if cg is None:
                    continue
                cg.parents.pop(name, None)
                if cg.implicit and not cg.parents:
                    self._drop(child)
        log.info("blockdev-del %s", name)

    # ------------------------------------------------------------------ devices
    def add_device(self, device: str, node_name: str) -> None:
        """A named backend over ``node_name`` (``--drive id=ID``)."""
        if device in self.devices or (device in self.nodes and device != node_name):
            raise GraphError(f"Duplicate ID '{device}' for drive")
        self.devices[device] = node_name
        self.nodes[node_name].parents[f"device {device}"] = "root"

    def close(self) -> None:
        """Close every node, parents before children; errors logged, the rest still closed."""
        for device, node_name in list(self.devices.items()):
            self.nodes[node_name].parents.pop(f"device {device}", None)
        self.devices.clear()
        while self.nodes:
            tops = [n for n, g in self.nodes.items() if not g.parents] or list(self.nodes)
            for name in tops:
                if name in self.nodes:
                    try:
                        self._drop(name)
                    except DirtybitsError as exc:
                        log.error("closing %s: %s", name, exc)

    # ------------------------------------------------------------------ queries
    def checkpoint_all(self) -> dict[str, list[dict[str, Any]]]:
        """Checkpoint every open node now; each node's bitmaps with their disk state."""
        out: dict[str, list[dict[str, Any]]] = {}
        for gn in self.nodes.values():
            if gn.node is None:
                continue
            if not gn.node.readonly and not gn.node.inactive:
                gn.node.checkpoint()
            out[gn.name] = [bitmap_info(b) for b in gn.node.bitmaps.query()]
        return out

    def _depth(self, gn: GraphNode) -> int:
        if gn.node is None:
            return 0
        depth, drv = 0, getattr(gn.node.driver, "backing", None)
        while drv is not None and depth < 64:
            depth += 1
            drv = getattr(getattr(drv, "driver", drv), "backing", None)
        return depth

    def _image(self, gn: GraphNode, flat: bool) -> dict[str, Any]:
        from dirtybits.qcow2.info import image_info

        try:
            st = os.stat(gn.path)
        except OSError as exc:
            raise _open_error(gn.path, exc) from None
        if gn.driver == "file":
            return {"virtual-size": -(-st.st_size // 512) * 512, "filename": gn.path,
                    "format": "file",
                    "actual-size": st.st_blocks * 512, "dirty-flag": False}
        info = dict(self._live_info(gn) or image_info(gn.path, gn.driver))
        if gn.node is not None:
            info["virtual-size"] = gn.node.size
        back = gn.children.get("backing")
        if back is not None and not flat:
            info["backing-image"] = self._image(self.nodes[back], flat)
        return info

    @staticmethod
    def _live_info(gn: GraphNode) -> dict[str, Any] | None:
        """A qcow2 node's image info from what its open image holds (header, bitmap
        directory): nothing is read, so a query costs no I/O. None: read it from disk."""
        from dirtybits.qcow2.bitmap_scan import BitmapScan
        from dirtybits.qcow2.image import Qcow2Image
        from dirtybits.qcow2.info import qcow2_info

        node = gn.node
        if node is None or not isinstance(node.driver, Qcow2Image):
            return None
        store = node.store
        if store is not None and (store.img is not node.driver or store.directory_problem):
            return None  # a container's store, or a directory only the disk can explain
        scan = BitmapScan(None, list(store.bitmaps) if store is not None else [])
        return dict(qcow2_info(gn.path, node.driver.hc, scanned=scan))

    def block_device_info(self, gn: GraphNode, flat: bool = False) -> dict[str, Any]:
        """QEMU's ``BlockDeviceInfo`` for one node (query-named-block-nodes' entries)."""
        ro = gn.readonly if gn.node is None else gn.node.readonly
        out: dict[str, Any] = {
            "file": gn.path, "node-name": gn.name, "ro": ro, "drv": gn.driver,
            "encrypted": False, "detect_zeroes": gn.detect_zeroes,
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "write_threshold": 0,
            "cache": {"writeback": True, "direct": gn.direct, "no-flush": gn.no_flush},
            "backing_file_depth": self._depth(gn),
            "image": self._image(gn, flat),
        }
        back = gn.children.get("backing")
        if back is not None:
            out["backing_file"] = self.nodes[back].path
        elif gn.node is not None:
            hc = getattr(gn.node.driver, "hc", None)
            name = getattr(hc, "backing_file", None)
            if isinstance(name, str) and name:
                out["backing_file"] = name
        if gn.node is not None:
            bitmaps = gn.node.bitmaps.query()
            if bitmaps:
                out["dirty-bitmaps"] = [bitmap_info(b) for b in bitmaps]
        return out

    def query_named_block_nodes(self, flat: bool = False) -> list[dict[str, Any]]:
        return [self.block_device_info(gn, flat) for gn in self.nodes.values()]

    def query_block(self) -> list[dict[str, Any]]:
        """``query-block``: the devices (QEMU lists backends, not bare nodes)."""
        out = []
        for device, node_name in self.devices.items():
            gn = self.nodes[node_name]
            out.append({"device": device, "locked": False, "removable": True,
                        "inserted": self.block_device_info(gn), "type": "unknown"})
        return out


def bitmap_info(info: Any) -> dict[str, Any]:
    """A ``dirty-bitmaps`` entry: QEMU's keys, and beyond QEMU under ``x-dirtybits`` (a key
    QEMU's clients ignore) the on-disk state, the reason unless it is ``clean`` or ``none``,
    and who holds a busy bitmap."""
    out = info.qmp()
    ext: dict[str, Any] = {"disk-state": info.disk_state.value}
    if info.disk_state not in (DiskState.CLEAN, DiskState.NONE):  # the others say why
        ext["reason"] = info.reason
    if info.owner:
        ext["owner"] = info.owner
    out["x-dirtybits"] = ext
    return dict(out)


__all__ = ["BlockGraph", "GraphError", "GraphNode", "bitmap_info"]
