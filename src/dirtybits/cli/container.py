"""``dirtybits container``: one qcow2 file holding persistent bitmaps for many raw drives.

    dirtybits container create C.qcow2 [--max-size SIZE]
    dirtybits container attach C.qcow2 DRIVE.raw [--id ID]
    dirtybits container detach C.qcow2 ID [--force]
    dirtybits container rebind C.qcow2 ID [DRIVE.raw]
    dirtybits container list C.qcow2 [--output=human|json]
    dirtybits container bitmap C.qcow2 ID --add NAME [-g GRAN] [--disabled]
                                          | --remove NAME | --clear NAME
                                          | --enable NAME | --disable NAME
                                          | --dump NAME [--json | --totals]

Writes to a drive are recorded with ``dirtybits io --bitmap-file C.qcow2 DRIVE.raw`` (or
``dirtybits.open(DRIVE.raw, bitmap_file=C.qcow2)``). The binding rules are in
``dirtybits.block.container``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from dirtybits.errors import DirtybitsError, UsageError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("container", help="bitmaps for many raw drives in one qcow2 file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cs = p.add_subparsers(dest="container_command", metavar="ACTION")
    c = cs.add_parser("create", help="create an empty container")
    c.add_argument("container")
    c.add_argument("--max-size", default=None,
                   help="largest drive it can serve (default 4T; it grows while it holds no "
                        "bitmaps, never after)")
    a = cs.add_parser("attach", help="bind a raw drive to the container")
    a.add_argument("container")
    a.add_argument("drive")
    a.add_argument("--id", dest="drive_id", help="drive id (default: the file name's stem)")
    d = cs.add_parser("detach", help="forget a drive (--force also removes its bitmaps)")
    d.add_argument("container")
    d.add_argument("drive_id", metavar="ID")
    d.add_argument("--force", action="store_true")
    r = cs.add_parser("rebind", help="accept a replaced, moved or resized drive file")
    r.add_argument("container")
    r.add_argument("drive_id", metavar="ID")
    r.add_argument("drive", nargs="?", help="the drive's file (default: the recorded path)")
    ls = cs.add_parser("list", help="drives, sizes, bitmaps and dirty bytes")
    ls.add_argument("container")
    ls.add_argument("--output", choices=("human", "json"), default="human")
    b = cs.add_parser("bitmap", help="add, remove, clear, enable, disable or dump a bitmap")
    b.add_argument("container")
    b.add_argument("drive_id", metavar="ID")
    acts = b.add_mutually_exclusive_group(required=True)
    for name in ("add", "remove", "clear", "enable", "disable", "dump"):
        acts.add_argument(f"--{name}", metavar="NAME")
    b.add_argument("-g", "--granularity", help="with --add: bytes per bit (default 64k)")
    b.add_argument("--disabled", action="store_true", help="with --add: not recording")
    b.add_argument("--json", action="store_true", help="--dump as nbdinfo --json")
    b.add_argument("--totals", action="store_true", help="--dump as nbdinfo --totals")
    p.set_defaults(container_command=None)


def run(args: argparse.Namespace) -> int:
    from dirtybits.block.container import Container

    cmd = args.container_command
    if cmd is None:
        raise UsageError("an action is needed: create, attach, detach, rebind, list, bitmap")
    if cmd == "create":
        from dirtybits.block.container import DEFAULT_MAX_SIZE

        size = _size(args.max_size, "--max-size") if args.max_size else DEFAULT_MAX_SIZE
        Container.create(args.container, size)
        return 0
    readonly = cmd == "list" or (cmd == "bitmap" and args.dump is not None)
    with Container.open(args.container, readonly=readonly) as c:
        if cmd == "attach":
            rec = c.attach(args.drive, args.drive_id)
            print(f"attached '{args.drive}' as '{rec.id}' ({rec.size} bytes)")
        elif cmd == "detach":
            removed = c.detach(args.drive_id, force=args.force)
            extra = f" and its bitmaps {', '.join(removed)}" if removed else ""
            print(f"detached '{args.drive_id}'{extra}")
        elif cmd == "rebind":
            rec = c.rebind(args.drive_id, args.drive)
            print(f"'{rec.id}' is now {rec.path} ({rec.size} bytes)")
        elif cmd == "list":
            write_list(c, sys.stdout, json_out=args.output == "json")
        else:
            return _bitmap(c, args, sys.stdout)
    return 0


def _size(text: str, what: str) -> int:
    from dirtybits.sizes import parse_size

    try:
        return int(parse_size(text))
    except DirtybitsError:
        raise UsageError(f"invalid {what}: {text!r}") from None


def _bitmap(c: Any, args: argparse.Namespace, out: TextIO) -> int:
    if args.granularity is not None and args.add is None:
        raise UsageError("granularity only supported with --add")
    if args.disabled and args.add is None:
        raise UsageError("--disabled only supported with --add")
    if (args.json or args.totals) and args.dump is None:
        raise UsageError("--json and --totals only go with --dump")
    drive = args.drive_id
    if args.add is not None:
        gran = _size(args.granularity, "granularity") if args.granularity else None
        c.add_bitmap(drive, args.add, gran, disabled=args.disabled)
    elif args.remove is not None:
        for note in c.remove_bitmap(drive, args.remove):
            print(f"dirtybits container: warning: {note}; 'dirtybits check -r leaks' "
                  "reclaims them", file=sys.stderr)
    elif args.clear is not None:
        c.clear_bitmap(drive, args.clear)
    elif args.enable is not None or args.disable is not None:
        c.set_bitmap_enabled(drive, args.enable or args.disable, args.enable is not None)
    else:
        from dirtybits.cli.bitmap import write_map

        bm = c.load_bitmap(drive, args.dump)
        write_map(out, bm.extents(0, bm.size), bm.size, json_out=args.json,
                  totals=args.totals)
    return 0


def list_data(c: Any) -> dict[str, Any]:
    """What ``list`` shows, as plain data (the JSON output)."""
    drives = []
    for rec in c.drives:
        drives.append({
            "id": rec.id,
            "path": rec.path,
            "size": rec.size,
            "uuid": str(rec.uuid),
            "identity": "xattr+inode" if rec.xattr else "device+inode",
            "status": c.drive_status(rec.id),
            "bitmaps": [{
                "name": bi.name,
                "stored-name": bi.stored_name,
                "granularity": bi.granularity,
                "recording": bi.enabled,
                "state": bi.state,
                "dirty-bytes": bi.dirty_bytes,
                **({"problems": bi.problems} if bi.problems else {}),
            } for bi in c.bitmap_infos(rec.id)],
        })
    return {"container": c.path, "max-size": c.max_size, "drives": drives,
            "unbound-bitmaps": c.unbound_bitmaps()}


def write_list(c: Any, out: TextIO, *, json_out: bool = False) -> None:
    data = list_data(c)
    if json_out:
        json.dump(data, out, indent=2)
        out.write("\n")
        return
    out.write(f"container: {data['container']} (max drive size {data['max-size']} bytes, "
              f"{len(data['drives'])} drives)\n")
    for d in data["drives"]:
        status = "" if d["status"] == "ok" else f"  !! {d['status']}"
        out.write(f"{d['id']}: {d['path']}, {d['size']} bytes{status}\n")
        for b in d["bitmaps"]:
            dirty = "?" if b["dirty-bytes"] is None else str(b["dirty-bytes"])
            state = "" if b["state"] == "consistent" else f" [{b['state']}]"
            rec = "recording" if b["recording"] else "disabled"
            out.write(f"    {b['name']}: granularity {b['granularity']}, {rec}, "
                      f"dirty {dirty} bytes{state}\n")
    if data["unbound-bitmaps"]:
        out.write(f"unbound bitmaps (no attached drive): "
                  f"{', '.join(data['unbound-bitmaps'])}\n")
