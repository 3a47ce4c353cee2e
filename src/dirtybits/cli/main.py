"""``dirtybits`` entry point: one subcommand a module, imported only when used.

Each subcommand module under ``dirtybits.cli`` provides ``add_parser(subparsers)`` and
``run(args) -> int``. Keeping imports lazy keeps a one-shot ``dirtybits info`` fast.

Logging: the package logs its decisions (opens and closes, repairs, recoveries, locks) through
``logging``; the command line shows them only when asked, with ``--log-level LEVEL`` before the
subcommand or ``DIRTYBITS_LOG_LEVEL=LEVEL``, on stderr. Without either, logging is left as
Python sets it up, so a command prints exactly what it printed before.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_ENV = "DIRTYBITS_LOG_LEVEL"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

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
    "nbd": ("dirtybits.cli.nbd", "serve a disk image over NBD (qemu-nbd's options)"),
    "serve": ("dirtybits.cli.serve", "keep drives open and serve them over QMP (a daemon)"),
    "demo": ("dirtybits.cli.demo", "run the built-in demonstration"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that subcommand's options loaded."""
    parser = argparse.ArgumentParser(
        prog="dirtybits",
        description="Persistent dirty bitmaps for virtual disk images (qemu-img compatible).",
    )
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
                        help=f"log what dirtybits does on stderr, at LEVEL "
                             f"({', '.join(LOG_LEVELS)}) and above (default: not at all; "
                             f"also {LOG_ENV}=LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, _help) in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        importlib.import_module(module).add_parser(sub)
    return parser


def _command_word(args: list[str]) -> str | None:
    """The subcommand, past the global options before it (``--log-level LEVEL``)."""
    i = 0
    while i < len(args):
        if args[i] == "--log-level":
            i += 2
        elif args[i].startswith("--log-level="):
            i += 1
        else:
            return args[i]
    return None


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    first = _command_word(args_list)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(args_list)
    level = args.log_level
    if level is None and os.environ.get(LOG_ENV):
        level = os.environ[LOG_ENV].lower()
        if level not in LOG_LEVELS:
            parser.error(f"{LOG_ENV}: invalid level '{os.environ[LOG_ENV]}' (choose from "
                         f"{', '.join(LOG_LEVELS)})")
    configure_logging(level)
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


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_handler: _StderrHandler | None = None


def configure_logging(level: str | None) -> None:
    """Show the package's log records of ``level`` and above on stderr. None shows nothing
    of ours: logging stays as Python sets it up (its last resort prints warnings, as always),
    undoing what an earlier call in this process did."""
    global _handler
    logger = logging.getLogger("dirtybits")
    if level is None:
        if _handler is not None:
            logger.removeHandler(_handler)
            logger.setLevel(logging.NOTSET)
            _handler = None
        return
    if _handler is None:
        _handler = _StderrHandler()
        _handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(_handler)
    number = logging.getLevelName(level.upper())
    _handler.setLevel(number)
    logger.setLevel(number)


def os_error_text(exc: OSError) -> str:
    """``FILE: REASON`` (qemu-io's way of quoting the OS), or the reason alone."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


if __name__ == "__main__":
    sys.exit(main())
