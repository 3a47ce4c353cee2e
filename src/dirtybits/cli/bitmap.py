"""``dirtybits bitmap``: qemu-img bitmap's actions, in command-line order, plus more.

Beyond qemu-img: ``--rename NEW``, ``--copy NEW``, ``--dump`` (the dirty extents exactly as
``nbdinfo --map=qemu:dirty-bitmap:NAME`` prints them, with ``--json`` / ``--totals``),
``--sha256`` (QEMU's ``x-debug-block-dirty-bitmap-sha256``) and ``--png FILE`` (a picture of
the disk with the dirty regions coloured, see ``bitmap_png``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from dirtybits.errors import DirtybitsError, UsageError

if TYPE_CHECKING:
    from dirtybits.block.node import BlockNode

READ_ACTIONS = ("dump", "sha256", "png")


class _Ordered(argparse.Action):
    """Collect actions in the order given, as qemu-img applies them."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        actions = getattr(namespace, "actions", None) or []
        actions.append((self.dest, values))
        namespace.actions = actions


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bitmap", help="manage persistent dirty bitmaps in an image",
                       description=__doc__)
    for name in ("add", "remove", "clear", "enable", "disable", "dump", "sha256"):
        p.add_argument(f"--{name}", dest=name, action=_Ordered, nargs=0)
    p.add_argument("--merge", dest="merge", action=_Ordered, metavar="SOURCE")
    p.add_argument("--rename", dest="rename", action=_Ordered, metavar="NEW_NAME")
    p.add_argument("--copy", dest="copy", action=_Ordered, metavar="NEW_NAME")
    p.add_argument("--png", dest="png", action=_Ordered, metavar="FILE.png",
                   help="draw the bitmap as a grid of the disk, dirty regions coloured")
    p.add_argument("-g", "--granularity", dest="granularity")
    p.add_argument("-b", "--source-file", dest="source_file")
    p.add_argument("-F", "--source-format", dest="source_format")
    p.add_argument("-f", dest="fmt")
    p.add_argument("--json", action="store_true", help="--dump as nbdinfo --json")
    p.add_argument("--totals", action="store_true", help="--dump as nbdinfo --totals")
    from dirtybits.cli.bitmap_recover import add_arguments as add_recover_arguments

    add_recover_arguments(p)  # --recover --reference FILE [--reference-format FMT] [-p]
    p.add_argument("filename")
    p.add_argument("bitmap")
    p.set_defaults(actions=None)


def _parse_granularity(text: str) -> int:
    from dirtybits.sizes import parse_size

    try:
        return int(parse_size(text))
    except DirtybitsError:
        raise UsageError("Invalid granularity specified") from None


def run(args: argparse.Namespace) -> int:
    actions: list[tuple[str, Any]] = args.actions or []
    if not actions:
        raise UsageError("Need at least one of --add, --remove, --clear, --enable, --disable, "
                         "--merge, --rename, --copy, --recover, --dump, --sha256 or --png")
    kinds = {a for a, _ in actions}
    if args.granularity is not None and "add" not in kinds:
        raise UsageError("granularity only supported with --add")
    if args.source_format and not args.source_file:
        raise UsageError("-F only supported with -b")
    from dirtybits.cli.bitmap_recover import check_arguments as check_recover_arguments

    check_recover_arguments(args, kinds)
    if args.source_file and "merge" not in kinds:
        raise UsageError("Merge bitmap source file only supported with --merge")
    if args.fmt not in (None, "qcow2"):
        raise UsageError(f"Format driver '{args.fmt}' does not support bitmaps")
    gran = _parse_granularity(args.granularity) if args.granularity is not None else None
    readonly = kinds <= set(READ_ACTIONS)

    from dirtybits.block.open import open_for_bitmaps

    name = args.bitmap
    with open_for_bitmaps(args.filename, readonly=readonly) as node:
        for action, value in actions:
            try:
                _apply(node, action, value, name, gran, args, sys.stdout)
            except DirtybitsError as exc:
                if str(exc).startswith("Could not open '"):  # qemu-img: opening -b, no prefix
                    print(f"dirtybits bitmap: {exc}", file=sys.stderr)
                else:
                    print(f"dirtybits bitmap: Operation {action} on bitmap {name} failed: "
                          f"{exc}", file=sys.stderr)
                return 1
    return 0


def _apply(node: BlockNode, action: str, value: Any, name: str, gran: int | None,
           args: argparse.Namespace, out: TextIO) -> None:
    """One action, through the node's bitmap registry."""
    reg = node.bitmaps
    if action == "add":
        reg.add(name, gran, persistent=True)
    elif action == "remove":
        for note in reg.remove(name):  # a damaged bitmap may leave clusters behind
            print(f"dirtybits bitmap: warning: {note}; 'dirtybits check -r leaks' reclaims "
                  "them", file=sys.stderr)
    elif action == "clear":
        reg.clear(name)
    elif action == "enable":
        reg.enable(name)
    elif action == "disable":
        reg.disable(name)
    elif action == "merge":
        _merge(node, name, value, args)
    elif action == "rename":
        reg.rename(name, value)
    elif action == "copy":
        reg.copy(name, value, persistent=True)
    elif action == "sha256":
        print(reg.bits(name).sha256(), file=out)
    elif action == "png":
        from dirtybits.cli.bitmap_png import render_png

        render_png(reg.bits(name), value, title=f"{args.filename}: bitmap '{name}'")
    elif action == "recover":
        from dirtybits.cli.bitmap_recover import apply_recover

        apply_recover(node, name, args, out)
    elif action == "dump":
        size = node.size & ~511  # an NBD export is the disk size aligned down to 512
        write_map(out, reg.runs(name, size), size, json_out=args.json, totals=args.totals)


def _merge(node: BlockNode, target: str, source: str, args: argparse.Namespace) -> None:
    if not args.source_file:
        node.bitmaps.merge(target, [source])
        return
    if args.source_format not in (None, "qcow2"):
        raise UsageError(f"Format driver '{args.source_format}' does not support bitmaps")
    from dirtybits.block.open import open_for_bitmaps
    from dirtybits.errors import LockError

    try:
        src = open_for_bitmaps(args.source_file, readonly=True, open_backing=False)
    except LockError as exc:  # e.g. the source is the image being changed: qemu-img's words
        raise LockError(f"Could not open '{args.source_file}': {exc.reason}", exc.hint) from None
    with src:
        node.bitmaps.merge(target, [(src.bitmaps, source)])


def write_map(out: TextIO, extents: Iterable[tuple[int, int, bool]], size: int, *,
              json_out: bool = False, totals: bool = False) -> None:
    """Print extents in nbdinfo's --map layout for a qemu:dirty-bitmap context."""
    runs = [(start, length, 1 if dirty else 0) for start, length, dirty in extents if length]
    desc = {0: "clean", 1: "dirty"}
    if totals:
        sums = {0: 0, 1: 0}
        for _, length, kind in runs:
            sums[kind] += length
        for kind in (0, 1):
            if sums[kind]:
                pct = 100.0 * sums[kind] / size if size else 0.0
                out.write(f"{sums[kind]:10d} {pct:5.1f}% {kind:3d} {desc[kind]}\n")
        return
    if json_out:
        out.write("[\n")
        out.write(",\n".join(
            f'{{ "offset": {s}, "length": {n}, "type": {k}, "description": "{desc[k]}"}}'
            for s, n, k in runs))
        out.write("\n]\n" if runs else "]\n")
        return
    for s, n, k in runs:
        out.write(f"{s:10d}  {n:10d}  {k:3d}  {desc[k]}\n")
