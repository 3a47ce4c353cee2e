#!/usr/bin/python3
"""The libnbd client of ``bench/nbd_bench.py``: one connection to one NBD server, the work
the spec on standard input asks for, one line of JSON on standard output.

It runs under Debian's ``/usr/bin/python3`` (python3-libnbd is installed for that
interpreter, not for the project's venv). Every timing is taken inside this process after the
handshake, so neither interpreter start-up nor connection set-up is in it.

Spec (JSON object): ``socket`` (unix socket path), ``mode`` and the mode's keys:

- ``read``: ``length`` (bytes per request), ``depth`` (requests in flight), reads the whole
  export in order; with ``verify`` (one request at a time, untimed) the sha256 of the export.
- ``rand``: ``length``, ``depth``, ``count``, ``seed``: ``count`` reads at random
  ``length``-aligned offsets (the same offsets for the same seed and export size); with
  ``verify`` a sha256 over every read's offset and data, in the order issued.
- ``dirty``: ``context`` (a meta context, e.g. ``qemu:dirty-bitmap:b0``), ``passes``: that many
  block status walks over the whole export (each timed); then, when ``depth`` > 0, reads every
  extent whose flags have bit 0 set, in requests of at most ``max_request`` bytes with
  ``depth`` in flight (timed). Returns the first walk's extents (merged where neighbours have
  the same flags), how many the server sent, and the pull's digest with ``verify``.

A request that fails makes the client exit 1 with the error on standard error.
"""

import hashlib
import json
import random
import sys
import time

import nbd

STATUS_MAX = (1 << 32) - (1 << 20)  # the longest block status request, 1 MiB-aligned


def connect(spec, contexts=()):
    h = nbd.NBD()
    h.set_pread_initialize(False)  # no zeroing of read buffers: the server fills them
    for context in contexts:
        h.add_meta_context(context)
    h.connect_unix(spec["socket"])
    return h


def pull(h, requests, depth, verify):
    """Read ``(offset, length)`` requests with up to ``depth`` in flight. Returns (seconds,
    {offset: sha256 hex} when verifying)."""
    digests = {}
    errors = []
    pending = iter(requests)
    start = time.perf_counter()
    if depth == 1:  # one at a time: the synchronous call, no poll loop
        for off, length in pending:
            data = h.pread(length, off)
            if verify:
                digests[off] = hashlib.sha256(data).hexdigest()
        return time.perf_counter() - start, digests

    # a pool of ``depth`` buffers, reused: a fresh bytearray per request costs an mmap and
    # page faults for every read over 128 KiB
    longest = max((n for _, n in requests), default=0)
    pool = [bytearray(longest) for _ in range(depth)]

    def submit(off, length):
        ba = pool.pop()
        view = memoryview(ba)[:length]

        def done(err, ba=ba, view=view, off=off):
            if err.value:
                errors.append(f"read at {off}: errno {err.value}")
            elif verify:
                digests[off] = hashlib.sha256(view).hexdigest()
            view.release()
            pool.append(ba)
            return 1  # retire the command

        h.aio_pread(nbd.Buffer.from_buffer(view), off, completion=done)

    more = True
    while True:
        while more and h.aio_in_flight() < depth:
            nxt = next(pending, None)
            if nxt is None:
                more = False
                break
            submit(*nxt)
        if not more and h.aio_in_flight() == 0:
            break
        h.poll(-1)
    seconds = time.perf_counter() - start
    if errors:
        sys.exit("; ".join(errors[:5]))
    return seconds, digests


def combined(digests):
    """One sha256 over the (offset, digest) pairs in offset order."""
    h = hashlib.sha256()
    for off in sorted(digests):
        h.update(f"{off}:{digests[off]}\n".encode())
    return h.hexdigest()


def mode_read(h, spec):
    size, length = h.get_size(), spec["length"]
    reqs = [(off, min(length, size - off)) for off in range(0, size, length)]
    if spec.get("verify"):  # in order, one at a time: the sha256 of the whole export
        d = hashlib.sha256()
        for off, n in reqs:
            d.update(h.pread(n, off))
        return {"seconds": None, "bytes": size, "digest": d.hexdigest()}
    seconds, _ = pull(h, reqs, spec["depth"], False)
    return {"seconds": seconds, "bytes": size}


def mode_rand(h, spec):
    size, length = h.get_size(), spec["length"]
    rnd = random.Random(spec["seed"])
    slots = size // length
    offsets = [rnd.randrange(slots) * length for _ in range(spec["count"])]
    verify = spec.get("verify", False)
    if verify:  # one at a time, in order: a digest over the sequence of reads
        d = hashlib.sha256()
        for off in offsets:
            d.update(f"{off}:".encode())
            d.update(h.pread(length, off))
        return {"seconds": None, "bytes": length * len(offsets), "digest": d.hexdigest()}
    seconds, _ = pull(h, [(off, length) for off in offsets], spec["depth"], False)
    return {"seconds": seconds, "bytes": length * len(offsets)}


def walk(h, context, size):
    """One block status walk over the whole export: (extents as [offset, length, flags],
    replies, extents the server sent)."""
    got = []

    def extent(metacontext, offset, entries, err):
        if metacontext == context:
            got.append((offset, entries))
        return 0

    extents = []
    off = replies = sent = 0
    while off < size:
        got.clear()
        h.block_status(min(STATUS_MAX, size - off), off, extent)
        replies += 1
        if not got:
            sys.exit(f"block status at {off}: no {context} extents")
        for start, entries in got:
            pos = start
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                extents.append((pos, length, flags))
                pos += length
                sent += 1
            off = max(off, min(pos, size))
    return extents, replies, sent


def merged(extents, size):
    out = []
    for off, length, flags in extents:
        length = min(length, size - off)
        if length <= 0:
            continue
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
            out[-1][1] += length
        else:
            out.append([off, length, flags])
    return out


def mode_dirty(h, spec):
    context, size = spec["context"], h.get_size()
    if not h.can_meta_context(context):
        sys.exit(f"the server did not agree to {context}")
    walks = []
    first = None
    replies = sent = 0
    for _ in range(spec["passes"]):
        start = time.perf_counter()
        extents, replies, sent = walk(h, context, size)
        walks.append(time.perf_counter() - start)
        if first is None:
            first = merged(extents, size)
    out = {"status_seconds": walks, "extents": first, "replies": replies, "sent": sent}
    if spec.get("depth", 0) > 0:
        step = spec["max_request"]
        reqs = [(off + i, min(step, length - i))
                for off, length, flags in first if flags & 1
                for i in range(0, length, step)]
        seconds, digests = pull(h, reqs, spec["depth"], spec.get("verify", False))
        out.update(pull_seconds=seconds, pull_bytes=sum(n for _, n in reqs),
                   pull_requests=len(reqs))
        if spec.get("verify"):
            out["digest"] = combined(digests)
    return out


def main():
    spec = json.load(sys.stdin)
    contexts = [spec["context"]] if spec["mode"] == "dirty" else []
    h = connect(spec, contexts)
    out = {"read": mode_read, "rand": mode_rand, "dirty": mode_dirty}[spec["mode"]](h, spec)
    out["multi_conn"] = bool(h.can_multi_conn())
    h.shutdown()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
