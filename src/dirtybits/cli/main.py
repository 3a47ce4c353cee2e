"""``dirtybits`` entry point: one subcommand a module, imported only when used.

Each subcommand module under ``dirtybits.cli`` provides ``add_parser(subparsers)`` and
``run(args) -> int``. Keeping imports lazy keeps a one-shot ``dirtybits info`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "create": ("dirtybits.cli.create", "create a new disk image"),
    "info": ("dirtybits.cli.info", "show information about a disk image"),
    "check": ("dirtybits.cli.check", "check a disk image for consistency (and repair it)"),
    "map": ("dirtybits.cli.map", "show the allocation map of a disk image"),
    "compare": ("dirtybits.cli.compare", "compare the guest-visible contents of two images"),
    "convert": ("dirtybits.cli.convert", "copy an image to a new image of a given format"),
    "io": ("dirtybits.cli.io", "run qemu-io style commands on an image"),
    "bitmap": ("dirtybits.cli.bitmap", "add, remove, change, dump persistent dirty bitmaps"),
    "resize": ("dirtybits.cli.resize", "change the virtual size of a disk image"),
    "snapshot": ("dirtybits.cli.snapshot", "list, create, apply or delete internal snapshots"),
    "amend": ("dirtybits.cli.amend", "change dirtybits options of an image (resilient mode)"),
    "container": ("dirtybits.cli.container", "bitmaps for many raw drives in one qcow2 file"),
    "demo": ("dirtybits.cli.demo", "run the built-in demonstration"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that subcommand's options loaded."""
    parser = argparse.ArgumentParser(
        prog="dirtybits",
        description="Persistent dirty bitmaps for virtual disk images (qemu-img compatible).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, _help) in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    first = args_list[0] if args_list else None
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(args_list)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    mod = importlib.import_module(SUBCOMMANDS[args.command][0])
    from dirtybits.errors import DirtybitsError

    try:
        return int(mod.run(args))
    except DirtybitsError as exc:
        print(f"dirtybits {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except OSError as exc:
        # last resort: the engine turns the errors it expects into DirtybitsError; anything
        # the OS says elsewhere is still one line, never a traceback
        print(f"dirtybits {args.command}: {os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def os_error_text(exc: OSError) -> str:
    """``FILE: REASON`` (qemu-io's way of quoting the OS), or the reason alone."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


if __name__ == "__main__":
    sys.exit(main())
