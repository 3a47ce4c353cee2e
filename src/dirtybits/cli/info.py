"""``dirtybits info``: qemu-img info's output, byte for byte.

QEMU prints JSON through a QDict, whose iteration order is its hash-bucket order, and its human
form walks the same QDict. ``qemu_json`` and ``dump_human`` reproduce both, so scripts that parse
or diff qemu-img's text keep working when pointed at dirtybits.

Beyond qemu-img, and only where qemu-img has nothing to show: ``--dirty`` adds each bitmap's
``dirty-bytes`` and ``dirty-percent`` (a fixed-point number with two decimals: QEMU's printer
would print a double as ``%.17g``, 12.339999999999999), an in-use bitmap gets
``"inconsistent": true`` instead; a damaged bitmap, which makes QEMU refuse the whole image,
is listed with ``"unusable": REASONS`` (``bitmaps-unusable`` when the directory itself is
unreadable). The human form prints these after QEMU's lines of the same block.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from decimal import Decimal
from typing import Any

from dirtybits.qcow2.info import ImageInfo, backing_chain_info, image_info

QDICT_BUCKET_MAX = 512


def _tdb_hash(key: str) -> int:
    """QEMU's qdict hash (``tdb_hash``), 32-bit unsigned."""
    raw = key.encode()
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, c in enumerate(raw):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: list[str]) -> list[str]:
    """Keys in the order a QDict built by inserting ``keys`` in turn iterates them."""
    buckets: dict[int, list[str]] = {}
    for key in keys:
        buckets.setdefault(_tdb_hash(key) % QDICT_BUCKET_MAX, []).insert(0, key)
    return [k for b in sorted(buckets) for k in buckets[b]]


def _json_string(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp < 0x20 or cp >= 0x7F:
            if cp >= 0x10000:
                cp -= 0x10000
                out.append(f"\\u{0xD800 | (cp >> 10):04X}\\u{0xDC00 | (cp & 0x3FF):04X}")
            else:
                out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def qemu_json(obj: Any, level: int = 0) -> str:
    """``qobject_to_json_pretty``: 4-space indent, QDict key order, ``[\\n  ]`` when empty."""
    pad = " " * (4 * (level + 1))
    end = " " * (4 * level)
    if isinstance(obj, dict):
        items = [f"{pad}{_json_string(k)}: {qemu_json(obj[k], level + 1)}"
                 for k in qdict_order(list(obj))]
        return "{\n" + ",\n".join(items) + ("\n" if items else "") + end + "}"
    if isinstance(obj, list):
        elems = [pad + qemu_json(v, level + 1) for v in obj]
        return "[\n" + ",\n".join(elems) + ("\n" if elems else "") + end + "]"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return f"{obj:.17g}"  # qnum_to_string of QEMU >= 6.0 (shortest exact form it knows)
    if isinstance(obj, Decimal):
        return format(obj, "f")  # fixed point: printed exactly as rounded (see dirty_percent)
    if isinstance(obj, str):
        return _json_string(obj)
    raise TypeError(f"cannot print {type(obj).__name__} as QEMU JSON")


def size_to_str(val: int) -> str:
    """QEMU's size_to_str: ``%0.3g`` with a binary suffix, switching up at 1000."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    exp = math.frexp(val / (1000.0 / 1024.0))[1]
    i = int((exp - 1) / 10)  # C division truncates toward zero
    return f"{val / (1 << (i * 10)):0.3g} {suffixes[i]}B"


# Keys dirtybits adds to qemu-img's ImageInfo (never present in what qemu-img can show): the
# human form prints them after QEMU's keys, dirty-bytes and dirty-percent as one line.
_OUR_KEYS = ("dirty-bytes", "dirty-percent", "inconsistent", "unusable", "bitmaps-unusable",
             "recoverable", "resilient")


def _dump_obj(obj: Any, indent: int, out: list[str]) -> None:
    """block/qapi.c dump_qobject: dicts and lists one item a line, dashes in keys as spaces."""
    if isinstance(obj, dict):
        pad = " " * (4 * indent)
        for key in qdict_order([k for k in obj if k not in _OUR_KEYS]):
            _dump_item(pad + key.replace("-", " ") + ":", obj[key], indent, out)
        if "dirty-bytes" in obj:
            n = obj["dirty-bytes"]
            out.append(f"{pad}dirty: {size_to_str(n)} ({n} bytes, {obj['dirty-percent']}%)\n")
        if obj.get("inconsistent"):
            out.append(f"{pad}dirty: unknown (inconsistent: in use, or not stored after a "
                       "crash)\n")
        for key in ("unusable", "bitmaps-unusable"):
            if key in obj:
                out.append(f"{pad}{key.replace('-', ' ')}: {obj[key]}\n")
        if "recoverable" in obj:
            out.append(f"{pad}recoverable: " + (
                "yes (resilient mode: the next tracked open rebuilds it from the write-intent "
                "map)\n" if obj["recoverable"] else
                "no (it was inconsistent before the write-intent map started)\n"))
        if "resilient" in obj:
            r = obj["resilient"]
            if "unusable" in r:
                out.append(f"{pad}resilient: on, map unusable: {r['unusable']}\n")
            else:
                state = ("valid" if r["map-valid"] else
                         "not valid (not started yet, or another program wrote the image)")
                out.append(f"{pad}resilient: on, region {size_to_str(r['region-size'])}, map "
                           f"{state}, {r['marked-regions']} marked regions\n")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _dump_item(" " * (4 * indent) + f"[{i}]:", value, indent, out)


def _dump_item(prefix: str, value: Any, indent: int, out: list[str]) -> None:
    if isinstance(value, dict | list):
        out.append(prefix + "\n")
        _dump_obj(value, indent + 1, out)
    else:
        text = ("true" if value else "false") if isinstance(value, bool) else (
            qemu_json(value) if isinstance(value, float) else str(value))
        out.append(f"{prefix} {text}\n")


def snapshot_line(sn: dict[str, Any] | None) -> str:
    if sn is None:
        return f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    nsec = sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]
    secs = nsec // 1_000_000_000
    clock = (f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
             f"{(nsec // 1_000_000) % 1000:03d}")
    icount = str(sn["icount"]) if "icount" in sn else ""
    return (f"{sn['id']:<9} {sn['name']:<16} {size_to_str(sn['vm-state-size']):>8}"
            f"{date:>20}{clock:>13}{icount:>11}")


def dump_human(info: ImageInfo) -> str:
    """``bdrv_image_info_dump`` of QEMU 7.2."""
    out = [
        f"image: {info['filename']}\n",
        f"file format: {info['format']}\n",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n",
        "disk size: "
        + (size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable")
        + "\n",
    ]
    if info.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        out.append(line + "\n")
        if "backing-filename-format" in info:
            out.append(f"backing file format: {info['backing-filename-format']}\n")
    if "snapshots" in info:
        out.append("Snapshot list:\n")
        out.append(snapshot_line(None) + "\n")
        out.extend(snapshot_line(sn) + "\n" for sn in info["snapshots"])
    if "format-specific" in info:
        out.append("Format specific information:\n")
        _dump_obj(info["format-specific"]["data"], 1, out)
    return "".join(out)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("info", help="show information about a disk image")
    p.add_argument("-f", "--format", dest="fmt", help="image format (default: probed)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--backing-chain", action="store_true",
                   help="also show every image of the backing chain")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read an image another process holds for writing (no locks taken)")
    p.add_argument("--dirty", action="store_true",
                   help="also show each bitmap's dirty bytes and percentage (reads its data)")
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from dirtybits.filelock import command_lock

    # qemu-img info's locks: refused while a writer holds the image, unless -U
    with command_lock(args.filename, args.fmt, info=True, force_share=args.force_share):
        if args.backing_chain:
            chain = backing_chain_info(args.filename, args.fmt, dirty=args.dirty)
            if args.output == "json":
                sys.stdout.write(qemu_json(chain) + "\n")
            else:
                sys.stdout.write("\n".join(dump_human(i) for i in chain))
            return 0
        info = image_info(args.filename, args.fmt, dirty=args.dirty)
    sys.stdout.write(qemu_json(info) + "\n" if args.output == "json" else dump_human(info))
    return 0
