"""QMP commands of the daemon: QEMU 7.2's block commands and the seed's additions.

Each command is an argument schema (``proto.qmp.schema``, checked with QEMU's texts) and an
async handler. Handlers reach the block layer only through the facade: one ``layer.call``
per command, so a command (a ``transaction`` too) is atomic with respect to all I/O.

The seed's additions (QEMU clients never send them, so nothing changes for them):

* ``block-dirty-bitmap-add`` takes ``x-mode`` (``none``, ``self``: the node's own image,
  ``file``: the container ``x-target`` that holds the drive's bitmaps) beside ``persistent``;
* ``block-dirty-bitmap-copy`` (``node``, ``name``, ``new-name``, ``persistent``: the copy is
  transient unless asked, ``disabled``);
* ``block-dirty-bitmap-edit`` (``node``, ``name``; ``new-name``, ``persistent``, ``auto``:
  recording at the next open, ``granularity``: coarser always, finer only when empty);
* ``x-dirtybits-checkpoint`` (``node`` optional): checkpoint now; every bitmap's on-disk state.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dirtybits.block.graph import BlockGraph, GraphError, bitmap_info
from dirtybits.block.registry import Action, BitmapRegistry, transaction
from dirtybits.errors import DirtybitsError
from dirtybits.proto.qmp.core import ErrorClass, QmpError
from dirtybits.proto.qmp.schema import (
    BOOL,
    INT,
    STR,
    UINT32,
    Alternate,
    Enum,
    List,
    Member,
    Struct,
    Union,
    check,
    command,
)

if TYPE_CHECKING:
    from dirtybits.block.aio import AsyncBlockLayer
    from dirtybits.block.node import BlockNode
    from dirtybits.services.qemu_io import Executor

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

BLOCK_DIRTY_BITMAP = Struct("BlockDirtyBitmap", (Member("node", STR), Member("name", STR)))
BITMAP_ADD = Struct("BlockDirtyBitmapAdd", (
    Member("node", STR), Member("name", STR), Member("granularity", UINT32, True),
    Member("persistent", BOOL, True), Member("disabled", BOOL, True),
    Member("x-mode", STR, True), Member("x-target", STR, True)))
BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", BLOCK_DIRTY_BITMAP)
BITMAP_MERGE = Struct("BlockDirtyBitmapMerge", (
    Member("node", STR), Member("target", STR), Member("bitmaps", List(BITMAP_OR_STR))))
BITMAP_COPY = command("block-dirty-bitmap-copy", Member("node", STR), Member("name", STR),
                      Member("new-name", STR), Member("persistent", BOOL, True),
                      Member("disabled", BOOL, True))
BITMAP_EDIT = command("block-dirty-bitmap-edit", Member("node", STR), Member("name", STR),
                      Member("new-name", STR, True), Member("persistent", BOOL, True),
                      Member("auto", BOOL, True), Member("granularity", UINT32, True))
TRANSACTION_ACTIONS = {
    "abort": Struct("Abort", ()),
    "block-dirty-bitmap-add": BITMAP_ADD,
    "block-dirty-bitmap-remove": BLOCK_DIRTY_BITMAP,
    "block-dirty-bitmap-clear": BLOCK_DIRTY_BITMAP,
    "block-dirty-bitmap-enable": BLOCK_DIRTY_BITMAP,
    "block-dirty-bitmap-disable": BLOCK_DIRTY_BITMAP,
    "block-dirty-bitmap-merge": BITMAP_MERGE,
}
#: QEMU's other actions (jobs and snapshots): refused with a text that says so.
LATER_ACTIONS = ("blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync",
                 "blockdev-snapshot-sync", "drive-backup")
TRANSACTION_ACTION = Union(
    "TransactionAction", (Member("type", Enum("TransactionActionKind", tuple(
        TRANSACTION_ACTIONS))),), "type",
    {kind: Struct(f"{kind}-wrapper", (Member("data", spec),))
     for kind, spec in TRANSACTION_ACTIONS.items()})
TRANSACTION = command(
    "transaction", Member("actions", List(TRANSACTION_ACTION)),
    Member("properties", Struct("TransactionProperties", (
        Member("completion-mode", Enum("ActionCompletionMode", ("individual", "grouped")),
               True),)), True))


@dataclass(frozen=True)
class Spec:
    args: Struct | Union
    handler: Handler


def _gran(value: int | None) -> int | None:
    if value is not None and (value < 512 or value & (value - 1)):
        raise QmpError("Granularity must be power of 2 and at least 512")
    if value is not None and value > 1 << 31:
        raise QmpError("Granularity must be power of 2 and at most 2 GiB")  # pragma: no cover
    return value


class Commands:
    """The command table of one daemon (shared by all its monitors)."""

    def __init__(self, layer: AsyncBlockLayer, graph: BlockGraph, *,
                 version: dict[str, int], package: str,
                 quit: Callable[[], None], hmp_out: Callable[[str], None] | None = None,
                 hmp_err: Callable[[str], None] | None = None) -> None:
        self.layer = layer
        self.graph = graph
        self.version = version
        self.package = package
        self._quit = quit
        self._hmp_out = hmp_out or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self._hmp_err = hmp_err or (lambda text: (sys.stderr.write(text), sys.stderr.flush()))
        self._executors: dict[str, Executor] = {}
        self.table: dict[str, Spec] = {}
        self.emit: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        from dirtybits.services.qmp.nbd_commands import NbdCommands

        self.nbd = NbdCommands(layer, graph, lambda name, data: self.emit(name, data))
        no_args = Struct("none", ())
        for name, args, fn in (
            ("query-commands", no_args, self.query_commands),
            ("query-version", no_args, self.query_version),
            ("quit", no_args, self.quit),
            ("blockdev-add", Struct("BlockdevOptions", ()), self.blockdev_add),
            ("blockdev-del", command("blockdev-del", Member("node-name", STR)),
             self.blockdev_del),
            ("query-block", no_args, self.query_block),
            ("query-named-block-nodes",
             command("query-named-block-nodes", Member("flat", BOOL, True)),
             self.query_named_block_nodes),
            ("block-dirty-bitmap-add", BITMAP_ADD, self.bitmap_add),
            ("block-dirty-bitmap-remove", BLOCK_DIRTY_BITMAP, self.bitmap_remove),
            ("block-dirty-bitmap-clear", BLOCK_DIRTY_BITMAP, self.bitmap_clear),
            ("block-dirty-bitmap-enable", BLOCK_DIRTY_BITMAP, self.bitmap_enable),
            ("block-dirty-bitmap-disable", BLOCK_DIRTY_BITMAP, self.bitmap_disable),
            ("block-dirty-bitmap-merge", BITMAP_MERGE, self.bitmap_merge),
            ("x-debug-block-dirty-bitmap-sha256", BLOCK_DIRTY_BITMAP, self.bitmap_sha256),
            ("block-dirty-bitmap-copy", BITMAP_COPY, self.bitmap_copy),
            ("block-dirty-bitmap-edit", BITMAP_EDIT, self.bitmap_edit),
            ("x-dirtybits-checkpoint",
             command("x-dirtybits-checkpoint", Member("node", STR, True)), self.checkpoint),
            ("transaction", TRANSACTION, self.transaction),
            ("human-monitor-command",
             command("human-monitor-command", Member("command-line", STR),
                     Member("cpu-index", INT, True)), self.human_monitor_command),
        ):
            self.table[name] = Spec(args, fn)
        self.nbd.register(self.table, Spec)

    # ------------------------------------------------------------------ dispatch
    async def run(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run one command; raises ``QmpError`` (its class and QEMU's text) on failure."""
        spec = self.table.get(name)
        if spec is None:
            raise QmpError(f"The command {name} has not been found",
                           ErrorClass.COMMAND_NOT_FOUND)
        args = arguments if spec.args.name == "BlockdevOptions" else check(arguments,
                                                                            spec.args)
        try:
            return await spec.handler(args)
        except QmpError:
            raise
        except DirtybitsError as exc:
            raise QmpError(qmp_text(exc)) from exc

    # ------------------------------------------------------------------ plain commands
    async def query_commands(self, args: dict[str, Any]) -> Any:
        return [{"name": n} for n in (*self.table, "qmp_capabilities")]

    async def query_version(self, args: dict[str, Any]) -> Any:
        return {"qemu": self.version, "package": self.package}

    async def quit(self, args: dict[str, Any]) -> Any:
        self._quit()
        return {}

    # ------------------------------------------------------------------ nodes
    async def blockdev_add(self, args: dict[str, Any]) -> Any:
        from dirtybits.proto.qmp.blockdev import blockdev_options

        opts = blockdev_options(args)
        await self.layer.call(self.graph.add, opts)
        return {}

    async def blockdev_del(self, args: dict[str, Any]) -> Any:
        name = args["node-name"]
        await self.layer.call(self.graph.delete, name)
        self._executors.pop(name, None)
        return {}

    async def query_block(self, args: dict[str, Any]) -> Any:
        return await self.layer.call(self.graph.query_block)

    async def query_named_block_nodes(self, args: dict[str, Any]) -> Any:
        return await self.layer.call(self.graph.query_named_block_nodes,
                                     bool(args.get("flat", False)))

    # ------------------------------------------------------------------ bitmaps
    def _add_node(self, name: str) -> BlockNode:
        """The node for ``block-dirty-bitmap-add`` (``bdrv_lookup_bs``'s text)."""
        return self.graph.open_node(self.graph.lookup(name))

    def _action(self, kind: str, data: dict[str, Any]) -> tuple[BitmapRegistry, Action]:
        """A transaction action on its node's registry (on the block thread)."""
        if kind == "block-dirty-bitmap-add":
            node = self._add_node(data["node"])
            persistent = self._persistence(node, data)
            return node.bitmaps, node.bitmaps.action_add(
                data["name"], _gran(data.get("granularity")), persistent=persistent,
                disabled=bool(data.get("disabled", False)))
        reg = self.graph.bitmap_node(data["node"]).bitmaps
        if kind == "block-dirty-bitmap-merge":
            if not data["bitmaps"]:
                raise QmpError("block-dirty-bitmap-merge: 'bitmaps' is empty: name at least "
                               "one source bitmap")
            sources: list[str | tuple[BitmapRegistry, str]] = []
            for src in data["bitmaps"]:
                if isinstance(src, str):
                    sources.append(src)
                else:
                    sources.append((self.graph.bitmap_node(src["node"]).bitmaps, src["name"]))
            return reg, reg.action_merge(data["target"], sources)
        name = data["name"]
        if kind == "block-dirty-bitmap-remove":
            return reg, reg.action_remove(name)
        if kind == "block-dirty-bitmap-clear":
            return reg, reg.action_clear(name)
        if kind == "block-dirty-bitmap-enable":
            return reg, reg.action_enable(name, True)
        assert kind == "block-dirty-bitmap-disable"
        return reg, reg.action_enable(name, False)

    def _persistence(self, node: BlockNode, data: dict[str, Any]) -> bool:
        """``persistent`` with the seed's ``x-mode``/``x-target``."""
        mode = data.get("x-mode")
        persistent = bool(data.get("persistent", False))
        if mode is None:
            if "x-target" in data:
                raise QmpError("x-target needs x-mode=file")
            return persistent
        if mode not in ("none", "self", "file"):
            raise QmpError(f"Parameter 'x-mode' does not accept value '{mode}'")
        if "persistent" in data and persistent != (mode != "none"):
            raise QmpError(f"persistent={str(persistent).lower()} contradicts x-mode={mode}")
        if mode == "none":
            return False
        container = getattr(getattr(node, "container", None), "path", None)
        if mode == "self":
            if container is not None or node.store is None:
                raise QmpError(f"x-mode=self: node '{node.node_name}' cannot store bitmaps "
                               "in its own image (a raw image has no room for them)")
            return True
        target = data.get("x-target")
        if target is None:
            raise QmpError("x-mode=file needs x-target (the container file)")
        import os

        if container is None or not os.path.exists(target) or \
                not os.path.samefile(container, target):
            raise QmpError(
                f"x-mode=file: node '{node.node_name}' keeps its bitmaps in "
                f"{container or 'its own image'}, not in '{target}'; start the drive with "
                f"--drive ...,bitmap-file={target} to use that container")
        return True

    async def _one(self, kind: str, data: dict[str, Any]) -> None:
        def run() -> None:
            reg, act = self._action(kind, data)
            reg.transaction([act])

        await self.layer.call(run)

    async def bitmap_add(self, args: dict[str, Any]) -> Any:
        await self._one("block-dirty-bitmap-add", args)
        return {}

    async def bitmap_remove(self, args: dict[str, Any]) -> Any:
        await self._one("block-dirty-bitmap-remove", args)
        return {}

    async def bitmap_clear(self, args: dict[str, Any]) -> Any:
        await self._one("block-dirty-bitmap-clear", args)
        return {}

    async def bitmap_enable(self, args: dict[str, Any]) -> Any:
        await self._one("block-dirty-bitmap-enable", args)
        return {}

    async def bitmap_disable(self, args: dict[str, Any]) -> Any:
        await self._one("block-dirty-bitmap-disable", args)
        return {}

    async def bitmap_merge(self, args: dict[str, Any]) -> Any:
        await self._one("block-dirty-bitmap-merge", args)
        return {}

    async def bitmap_sha256(self, args: dict[str, Any]) -> Any:
        def run() -> str:
            return self.graph.bitmap_node(args["node"]).bitmaps.sha256(args["name"])

        return {"sha256": await self.layer.call(run)}

    async def bitmap_copy(self, args: dict[str, Any]) -> Any:
        def run() -> None:
            reg = self.graph.bitmap_node(args["node"]).bitmaps
            reg.copy(args["name"], args["new-name"], persistent=bool(args.get("persistent")),
                     disabled=args.get("disabled"))

        await self.layer.call(run)
        return {}

    async def bitmap_edit(self, args: dict[str, Any]) -> Any:
        def run() -> None:
            node = self.graph.bitmap_node(args["node"])
            edit_bitmap(node.bitmaps, args["name"], new_name=args.get("new-name"),
                        persistent=args.get("persistent"), auto=args.get("auto"),
                        granularity=_gran(args.get("granularity")))

        await self.layer.call(run)
        return {}

    async def checkpoint(self, args: dict[str, Any]) -> Any:
        def run() -> list[dict[str, Any]]:
            if "node" in args:
                node = self.graph.bitmap_node(args["node"])
                if not node.readonly and not node.inactive:
                    node.checkpoint()
                states = {node.node_name: [bitmap_info(b) for b in node.bitmaps.query()]}
            else:
                states = self.graph.checkpoint_all()
            return [{"node": n, "dirty-bitmaps": b} for n, b in states.items()]

        return await self.layer.call(run)

    # ------------------------------------------------------------------ transaction
    async def transaction(self, args: dict[str, Any]) -> Any:
        """All or nothing, across nodes; each action is looked up and prepared in order, so
        the first failure is the one QEMU reports."""
        for item in args["actions"]:
            if item["type"] in LATER_ACTIONS:  # pragma: no cover - not in the enum yet
                raise QmpError(f"transaction action '{item['type']}' is not supported yet")
        grouped = args.get("properties", {}).get("completion-mode") == "grouped"

        def step(kind: str, data: dict[str, Any]) -> tuple[BitmapRegistry | None, Action]:
            def refuse(exc: BaseException) -> tuple[None, Action]:
                def prepare() -> None:
                    raise exc
                return None, Action(kind, prepare)

            if kind == "abort":
                return refuse(QmpError("Transaction aborted using Abort action"))
            if grouped:
                return refuse(QmpError(f"Action '{kind}' does not support Transaction "
                                       "property completion-mode = grouped"))
            try:
                return self._action(kind, data)
            except DirtybitsError as exc:
                return refuse(exc)

        def run() -> None:
            transaction([step(item["type"], item["data"]) for item in args["actions"]])

        await self.layer.call(run)
        return {}

    # ------------------------------------------------------------------ HMP
    async def human_monitor_command(self, args: dict[str, Any]) -> Any:
        """HMP: ``qemu-io [-d] NODE "CMD"`` as QEMU's monitor runs it: qemu-io's output on
        the daemon's stdout and stderr, its ``error_report`` messages (and the monitor's own
        complaints) as the reply; anything else answered as QEMU's monitor answers it."""
        from dirtybits.proto.qmp.hmp import HmpError, parse_qemu_io

        line = args["command-line"]
        words = line.split(None, 1)
        if not words:
            return ""
        if words[0] != "qemu-io":
            return f"unknown command: '{words[0]}'\r\n"
        try:
            qdev, name, cmdline = parse_qemu_io(words[1] if len(words) > 1 else "")
        except HmpError as exc:
            if exc.printed:
                self._hmp_out(exc.printed + "\n")
            return _monitor_text(f"{exc}\nTry \"help qemu-io\" for more information\n")
        if qdev:  # -d names a guest device; a daemon has none
            return f"Error: Device '{name}' not found\r\n"

        def run() -> tuple[str, str, str]:
            from dirtybits.services.qemu_io import Executor

            key = self.graph.devices.get(name, name)
            gn = self.graph.nodes.get(key)
            if gn is None:
                raise GraphError(f"Cannot find device='' nor node-name='{name}'")
            node = self.graph.open_node(gn)
            ex = self._executors.get(key)
            if ex is None or ex.driver is not node:
                ex = Executor(node, sys.stdout, sys.stderr, prog="qemu-io")
                self._executors[key] = ex
            out = ex.execute_in_monitor(cmdline)
            return out.stdout, out.stderr, out.reply

        try:
            stdout, stderr, reply = await self.layer.call(run)
        except DirtybitsError as exc:
            return f"Error: {exc}\r\n"
        if stdout:
            self._hmp_out(stdout)
        if stderr:
            self._hmp_err(stderr)
        return _monitor_text(reply)


def qmp_text(exc: DirtybitsError) -> str:
    """An error's text for a QMP reply: without the hint a command line adds to a lock
    conflict (QEMU keeps hints out of QMP errors)."""
    from dirtybits.errors import LockError

    return exc.reason if isinstance(exc, LockError) else str(exc)


def _monitor_text(text: str) -> str:
    """Text as a monitor sends it: every line ends with CR LF."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def edit_bitmap(reg: BitmapRegistry, name: str, *, new_name: str | None = None,
                persistent: bool | None = None, auto: bool | None = None,
                granularity: int | None = None) -> None:
    """``block-dirty-bitmap-edit``. A rename or an ``auto`` change is one transaction. A
    change of persistence or granularity rebuilds the bitmap: a copy with the new settings
    is made and filled (one transaction: on failure nothing changed), then the old one is
    removed and the copy takes its name. A crash between those steps leaves both bitmaps,
    or the copy alone under ``NAME.edit`` (consistent, or in_use and so reported): never a
    bitmap that reads consistent without its bits. A finer granularity is refused unless the
    bitmap is empty (its bits cannot be split); a coarser one is a superset."""
    info = reg.info(name)
    final = new_name or name
    rebuild = (persistent is not None and persistent != info.persistent) or \
        (granularity is not None and granularity != info.granularity)
    if granularity is not None and granularity < info.granularity and info.count:
        raise QmpError(f"Bitmap '{name}' is not empty: its granularity can only grow "
                       f"(from {info.granularity}); clear it first to make it finer")
    enabled = info.recording if auto is None else auto
    if not rebuild:
        actions: list[Action] = []
        if auto is not None and auto != info.recording:
            actions.append(reg.action_enable(name, auto))
        if final != name:
            actions.append(reg.action_rename(name, final))
        if actions:
            reg.transaction(actions)
        return
    if info.busy:
        raise QmpError(f"Bitmap '{name}' is currently in use by another operation and cannot "
                       "be used")
    if final != name and reg.find(final) is not None:
        raise QmpError(f"Bitmap already exists: {final}")
    tmp, n = f"{name}.edit", 0
    while reg.find(tmp) is not None:
        n += 1
        tmp = f"{name}.edit{n}"
    reg.transaction([
        reg.action_add(tmp, granularity or info.granularity,
                       persistent=info.persistent if persistent is None else persistent,
                       disabled=not enabled),
        reg.action_merge(tmp, [name]),
    ])
    reg.remove(name)
    reg.rename(tmp, final)


__all__ = ["Commands", "edit_bitmap"]
