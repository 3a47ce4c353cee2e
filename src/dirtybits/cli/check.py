"""``dirtybits check``: qemu-img check's options, output and exit codes.

Exit codes (qemu-img's): 0 clean, 1 check not completed (internal error), 2 corruptions,
3 leaks only, 63 the format has no check. After a repair they describe what remains.
"""

from __future__ import annotations

import argparse
import sys

from dirtybits.cli.info import qemu_json
from dirtybits.qcow2.check import (
    CheckFailedError,
    CheckNotSupportedError,
    CheckResult,
    check_image,
)

EXIT_CLEAN = 0
EXIT_FAILED = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_NOT_SUPPORTED = 63


def human_summary(check: CheckResult) -> str:
    """dump_human_image_check of qemu-img 7.2."""
    out = []
    if not (check.corruptions or check.leaks or check.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if check.corruptions:
            out.append(f"\n{check.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if check.leaks:
            out.append(f"\n{check.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if check.check_errors:
            out.append(f"\n{check.check_errors} internal errors have occurred during the "
                       "check.\n")
    if check.total_clusters and check.allocated_clusters:
        a = check.allocated_clusters
        out.append(f"{a}/{check.total_clusters} = {a * 100.0 / check.total_clusters:0.2f}% "
                   f"allocated, {check.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                   f"{check.compressed_clusters * 100.0 / a:0.2f}% compressed clusters\n")
    if check.image_end_offset:
        out.append(f"Image end offset: {check.image_end_offset}\n")
    return "".join(out)


def repair_notice(check: CheckResult) -> str:
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {check.leaks_fixed} leaked clusters\n"
            f"    {check.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n")


def exit_code(check: CheckResult) -> int:
    if check.check_errors:
        return EXIT_FAILED
    if check.corruptions:
        return EXIT_CORRUPT
    return EXIT_LEAKS if check.leaks else EXIT_CLEAN


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("check", help="check a disk image for consistency (and repair it)")
    p.add_argument("-f", "--format", dest="fmt", help="image format (default: probed)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-r", "--repair", choices=("leaks", "all"),
                   help="repair leaked clusters, or all errors")
    p.add_argument("-q", "--quiet", action="store_true", help="print only error messages")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="accepted for qemu-img compatibility")
    p.add_argument("filename", metavar="FILE")


def _lines(lines: list[str]) -> None:
    if lines:
        sys.stdout.flush()
        sys.stderr.write("".join(line + "\n" for line in lines))
        sys.stderr.flush()


def _out(text: str, quiet: bool) -> None:
    if not quiet:
        sys.stdout.write(text)
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    if args.repair and args.force_share:
        print("dirtybits check: --repair is incompatible with --force-share", file=sys.stderr)
        return EXIT_FAILED
    from dirtybits.filelock import command_lock

    try:
        with command_lock(args.filename, args.fmt, readonly=not args.repair,
                          force_share=args.force_share):
            check = check_image(args.filename, args.repair, fmt=args.fmt)
    except CheckNotSupportedError as exc:
        print(f"dirtybits check: {exc}", file=sys.stderr)
        return EXIT_NOT_SUPPORTED
    except CheckFailedError as exc:
        _lines(exc.messages)
        print(f"dirtybits check: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if check.repaired:
        _lines(check.repair_messages)
        if args.output == "human":
            _out(repair_notice(check), args.quiet)
    _lines(check.messages)
    if args.output == "json":
        _out(qemu_json(check.to_qapi()) + "\n", args.quiet)
    else:
        _out(human_summary(check), args.quiet)
    if check.check_errors:
        print("dirtybits check: Check failed", file=sys.stderr)
    return exit_code(check)
