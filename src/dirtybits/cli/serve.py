"""``dirtybits serve``: keep drives open and serve them over QMP (a qemu-storage-daemon peer).

    dirtybits serve --blockdev '{"driver": "qcow2", "node-name": "n0",
                                 "file": {"driver": "file", "filename": "a.qcow2"}}' \\
                    --qmp unix:/run/db.sock
    dirtybits serve --blockdev driver=file,node-name=f0,filename=a.qcow2 \\
                    --blockdev driver=qcow2,node-name=n0,file=f0 --qmp unix:/run/db.sock
    dirtybits serve --drive file=disk.raw,id=d0,format=raw \\
                    --dirty-bitmap name=b0,drive=d0,file=bitmaps.qcow2,create=on \\
                    --qmp unix:/run/db.sock --pidfile /run/db.pid --daemonize

Any QMP client drives it (``qmp-shell /run/db.sock``, ``qemu.qmp``): QEMU 7.2's block and
bitmap commands, ``human-monitor-command`` with ``qemu-io NODE "CMD"``, and the seed's
additions (``block-dirty-bitmap-copy``, ``-edit``, ``x-dirtybits-checkpoint``). ``quit``,
SIGTERM and SIGINT checkpoint every bitmap and close cleanly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dirtybits.errors import DirtybitsError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="keep drives open and serve them over QMP",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blockdev", action="append", default=[], metavar="OPTIONS",
                   help="a block node, as qemu-storage-daemon's --blockdev (JSON or "
                        "key=value,... with dotted keys)")
    p.add_argument("--drive", action="append", default=[], metavar="OPTIONS",
                   help="file=PATH,id=ID[,format=qcow2|raw][,bitmap=auto|no][,read-only=on]"
                        "[,cache=MODE][,bitmap-file=CONTAINER]")
    p.add_argument("--dirty-bitmap", action="append", default=[], metavar="OPTIONS",
                   help="name=NAME,drive=ID[,file=PATH][,file_id=ID][,granularity=SIZE]"
                        "[,enabled=on|off][,create=on][,auto=on|off]")
    p.add_argument("--qmp", action="append", default=[], metavar="unix:PATH[,mode=0600]",
                   help="a QMP monitor socket (repeatable; mode 0600 unless told)")
    p.add_argument("--nbd-server", metavar="addr.type=unix,addr.path=PATH",
                   help="start the NBD server (addr.type=inet,addr.host=H,addr.port=P for TCP; "
                        "tls-creds=ID, max-connections=N)")
    p.add_argument("--export", action="append", default=[], metavar="OPTIONS",
                   help="type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on]"
                        "[,bitmaps.0=NAME][,allocation-depth=on][,description=TEXT]")
    p.add_argument("--object", action="append", default=[], metavar="OPTIONS",
                   help="tls-creds-x509,id=ID,endpoint=server,dir=DIR[,verify-peer=off]")
    p.add_argument("--pidfile", help="write the daemon's pid here (removed at exit)")
    p.add_argument("--daemonize", action="store_true",
                   help="run in the background; return once the sockets accept")


def run(args: argparse.Namespace) -> int:
    from dirtybits.services import daemon

    try:
        config = daemon.configure(blockdevs=args.blockdev, drives=args.drive,
                                  bitmaps=args.dirty_bitmap, qmp=args.qmp,
                                  pidfile=args.pidfile, objects=args.object,
                                  nbd_server=args.nbd_server, exports=args.export)
    except DirtybitsError as exc:
        print(f"dirtybits serve: {exc}", file=sys.stderr)
        return 1
    return daemon.run(config, daemonize=args.daemonize,
                      report=lambda text: print(f"dirtybits serve: {text}", file=sys.stderr))
