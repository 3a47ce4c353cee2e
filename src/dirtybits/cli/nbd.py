"""``dirtybits nbd``: serve one disk image over NBD, with qemu-nbd's options.

    dirtybits nbd -r -f qcow2 -B b0 -k /tmp/nbd.sock disk.qcow2 &
    nbdinfo --map=qemu:dirty-bitmap:b0 'nbd+unix:///?socket=/tmp/nbd.sock'

A script written for qemu-nbd runs unchanged: the options below are qemu-nbd's, with its
defaults (export name "", one client at a time, discard ignored, exit when the last client
leaves unless -t). One difference: without -b, TCP listens on 127.0.0.1, not every address.
Writes through the export are recorded in the image's bitmaps like any other write; the
bitmaps named with -B are busy while exported.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dirtybits.errors import DirtybitsError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("nbd", help="serve a disk image over NBD (qemu-nbd's options)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="FILENAME")
    p.add_argument("-r", "--read-only", action="store_true", dest="readonly",
                   help="export read-only")
    p.add_argument("-f", "--format", dest="fmt", metavar="FORMAT",
                   help="image format (qcow2, raw); probed when not given")
    p.add_argument("-B", "--bitmap", action="append", default=[], dest="bitmaps",
                   metavar="NAME", help="export the dirty bitmap NAME as the meta context "
                                        "qemu:dirty-bitmap:NAME (repeatable)")
    p.add_argument("-A", "--allocation-depth", action="store_true",
                   help="export the qemu:allocation-depth meta context")
    p.add_argument("-x", "--export-name", dest="name", default="", metavar="NAME",
                   help='the export\'s name (default "")')
    p.add_argument("-D", "--description", default="", metavar="TEXT",
                   help="the export's description")
    p.add_argument("-k", "--socket", metavar="PATH", help="listen on a unix socket")
    p.add_argument("-b", "--bind", metavar="ADDRESS",
                   help="TCP address to listen on (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, metavar="PORT",
                   help="TCP port to listen on (default 10809)")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client left")
    p.add_argument("-e", "--shared", type=int, default=1, metavar="NUM",
                   help="clients served at once (default 1, 0: no limit)")
    p.add_argument("--fork", action="store_true",
                   help="run in the background once the socket accepts")
    p.add_argument("--pid-file", dest="pidfile", metavar="PATH",
                   help="write the server's pid here")
    p.add_argument("--cache", default="writeback", metavar="MODE",
                   help="none, writeback (default), writethrough, directsync, unsafe")
    p.add_argument("--discard", default="ignore", metavar="MODE",
                   help="ignore (default) or unmap: what a client's TRIM does")
    p.add_argument("--detect-zeroes", default="off", metavar="MODE",
                   help="off (default), on, unmap: turn writes of zeroes into write-zeroes")
    p.add_argument("--object", action="append", default=[], dest="objects",
                   metavar="tls-creds-x509,id=ID,endpoint=server,dir=DIR",
                   help="TLS credentials (x509 certificates in DIR)")
    p.add_argument("--tls-creds", metavar="ID",
                   help="require TLS with the credentials object ID")


def run(args: argparse.Namespace) -> int:
    from dirtybits.services.nbd import tool

    def say(text: str) -> None:
        print(f"dirtybits nbd: {text}", file=sys.stderr)

    try:
        config = tool.configure(
            args.image, objects=args.objects, tls_creds=args.tls_creds, fmt=args.fmt,
            readonly=args.readonly, bitmaps=args.bitmaps,
            allocation_depth=args.allocation_depth, name=args.name,
            description=args.description, socket=args.socket, bind=args.bind, port=args.port,
            persistent=args.persistent, shared=args.shared, pidfile=args.pidfile,
            cache=args.cache, discard=args.discard, detect_zeroes=args.detect_zeroes)
    except DirtybitsError as exc:
        say(str(exc))
        return 1
    return tool.run(config, fork=args.fork, report=say)
