"""``dirtybits snapshot [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILENAME``.

qemu-img snapshot's options, output and messages: ``-l`` lists (nothing at all when there
is no snapshot), ``-c`` creates a disk-only snapshot, ``-a`` applies one (by ID, else by
name; refused while the image has persistent bitmaps, as in QEMU 7.2), ``-d`` deletes the
first snapshot with that name. ``-U`` lists an image another process has open.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from dirtybits.block.options import QemuError
from dirtybits.cli.options import ArgParser, add_command, report


def add_parser(sub: Any) -> None:
    add_command(sub, "snapshot", "list, create, apply or delete internal snapshots")


def _parser() -> ArgParser:
    p = ArgParser(prog="dirtybits snapshot", description=__doc__)
    for flag, kind in (("-a", "apply"), ("-c", "create"), ("-d", "delete")):
        p.add_argument(flag, dest="actions", action="append", metavar="SNAPSHOT",
                       type=_tagged(kind), help=f"{kind} a snapshot")
    p.add_argument("-l", dest="actions", action="append_const", const=("list", ""),
                   help="list the snapshots")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet mode")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the image shared (read-only actions)")
    p.add_argument("filenames", nargs="*", metavar="FILENAME")
    return p


def _tagged(kind: str) -> Callable[[str], tuple[str, str]]:
    return lambda value: (kind, value)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(_parser().parse_args(args.argv))
    except QemuError as exc:
        return report("snapshot", exc)


def _run(opts: argparse.Namespace) -> int:
    from dirtybits.block import snapshot as snap
    from dirtybits.errors import DirtybitsError
    from dirtybits.qcow2.snapshots import SnapshotError

    hint = "Try 'dirtybits snapshot --help' for more information\n"
    actions = opts.actions or []
    if len(actions) > 1:
        raise QemuError("Cannot mix '-l', '-a', '-c', '-d'", hint=hint)
    if len(opts.filenames) != 1:
        raise QemuError("Expecting one image file name", hint=hint)
    path = opts.filenames[0]
    kind, name = actions[0] if actions else ("none", "")
    if opts.force_share and kind != "list":
        raise QemuError(f"Could not open '{path}': force-share=on can only be used with "
                        "read-only images")
    verb = {"create": "create", "apply": "apply", "delete": "delete"}.get(kind)
    try:
        if kind == "list":
            entries = snap.list_snapshots(path, force_share=opts.force_share)
            if entries:
                sys.stdout.write(format_list(entries))
        elif kind == "create":
            snap.create_snapshot(path, name)
        elif kind == "apply":
            snap.apply_snapshot(path, name)
        elif kind == "delete":
            snap.delete_snapshot(path, name)
        else:  # qemu-img opens the image and does nothing
            snap.list_snapshots(path)
    except SnapshotError as exc:
        reason = (f"-{exc.errno} ({os.strerror(exc.errno)})" if kind == "create"
                  else str(exc))
        raise QemuError(f"Could not {verb} snapshot '{name}': {reason}") from None
    except DirtybitsError as exc:
        raise QemuError(f"Could not open '{path}': {exc}") from None
    return 0


def format_list(entries: list[Any]) -> str:
    """``Snapshot list:`` and one line a snapshot, as qemu-img snapshot -l and info."""
    from dirtybits.cli.info import snapshot_line
    from dirtybits.format.qcow2.snapshot import NO_ICOUNT

    lines = ["Snapshot list:", snapshot_line(None)]
    for sn in entries:
        info: dict[str, Any] = {
            "id": sn.id_str, "name": sn.name, "vm-state-size": sn.vm_state_size,
            "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
            "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
        }
        if sn.icount != NO_ICOUNT:
            info["icount"] = sn.icount
        lines.append(snapshot_line(info))
    return "\n".join(lines) + "\n"
