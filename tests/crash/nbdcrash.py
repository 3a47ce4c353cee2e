"""Crashes of writes through an NBD export: a workload of NBD requests, its models, a driver.

Shared by the kill -9 runs (``test_kill9_nbd.py``: ``dirtybits nbd`` as a user runs it,
killed at a random moment) and the power-loss runs (``test_power_loss_nbd.py``: the NBD
server in process, its file calls traced by ``powerloss.Recorder``).

The image is the daemon crash tests' (``daemoncrash.SPEC``: 4 KiB clusters, 8 MiB, the
persistent bitmaps ``g16k`` recording and ``frozen`` disabled, made by QEMU's tools). The
workload (``steps``): WRITEs (some with FUA, some not sector-aligned), WRITE_ZEROES (with
and without NO_HOLE, some with FUA), TRIMs (the export runs with ``--discard unmap``: they
reach the image and are recorded, as in QEMU) and FLUSHes, sent one at a time by
``peers.rawnbd``'s client, each waiting for its reply.

The models: ``model_steps`` turns the workload into ``regcrash`` steps (a TRIM is recorded
like a write-zeroes; the model's data is not used by its judge here, no baseline moves), so
``regcrash.judge_image`` judges the bitmaps; ``Guest`` keeps the guest data a client may
expect (a TRIM's range: as before or zeros, sector by sector).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import daemoncrash as dc

from peers import rawnbd as nbd

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
SPEC = dc.SPEC
EXPORTED = "g16k"  # exported with -B as well (busy while served; it records all the same)
SERVER_OPTIONS = ("-t", "-f", "qcow2", "--discard", "unmap", "-B", EXPORTED)
Step = dict[str, Any]


def steps(seed: int, count: int | None = None) -> list[Step]:
    """The workload of ``seed``: ``count`` (default 25-50) requests."""
    rng = random.Random(seed)
    out: list[Step] = []
    for _ in range(count if count is not None else rng.randrange(25, 50)):
        r = rng.random()
        s = rng.random()
        length = (rng.randrange(1, 9) * SECTOR if s < 0.4 else
                  rng.randrange(1, 33) * 4 * KiB if s < 0.85 else
                  rng.randrange(1, 9) * 64 * KiB)
        offset = rng.randrange(0, (SPEC.size - length) // SECTOR) * SECTOR
        if r < 0.08:  # not sector-aligned: the edges are read, modified, written
            offset += rng.randrange(1, SECTOR)
            length = min(length, SPEC.size - offset) - rng.randrange(0, SECTOR)
        fua = rng.random() < 0.2
        if r < 0.6:
            pat = rng.randrange(1, 256)
            out.append({"op": "write", "off": offset, "len": length, "pat": pat,
                        "data": bytes([pat]) * length, "fua": fua})
        elif r < 0.75:
            out.append({"op": "zero", "off": offset, "len": length,
                        "unmap": rng.random() < 0.5, "fua": fua})
        elif r < 0.87:
            out.append({"op": "trim", "off": offset, "len": length})
        else:
            out.append({"op": "flush"})
    return out


def model_steps(todo: list[Step]) -> list[Step]:
    """``regcrash`` steps: a TRIM is a recorded change of its range, as a write-zeroes."""
    out = []
    for s in todo:
        if s["op"] == "trim":
            out.append({"op": "zero", "off": s["off"], "len": s["len"], "unmap": True})
        elif s["op"] in ("write", "zero"):
            out.append({k: v for k, v in s.items() if k != "fua"})
        else:
            out.append(s)
    return out


def frame(c: nbd.Client, step: Step, cookie: int) -> bytes:
    """The NBD request of ``step``."""
    op = step["op"]
    if op == "write":
        return c.request(nbd.WRITE, cookie, step["off"], step["len"],
                         nbd.FLAG_FUA if step["fua"] else 0, step["data"])
    if op == "zero":
        flags = (0 if step["unmap"] else nbd.FLAG_NO_HOLE) | (nbd.FLAG_FUA if step["fua"]
                                                              else 0)
        return c.request(nbd.WRITE_ZEROES, cookie, step["off"], step["len"], flags)
    if op == "trim":
        return c.request(nbd.TRIM, cookie, step["off"], step["len"],
                         nbd.FLAG_FUA if step.get("fua") else 0)
    if op == "flush":
        return c.request(nbd.FLUSH, cookie)
    raise ValueError(op)


def describe(step: Step) -> str:
    return str({k: v for k, v in step.items() if k != "data"})


# ---------------------------------------------------------------------------- guest data
class Guest:
    """What each 512-byte sector may hold after a crash. ``now``: the values a sector may
    hold in the server's view (one, but a TRIM leaves the data before it or zeros);
    ``hist``: the values it may hold on disk after a crash: those since its last durable
    point (a completed FLUSH; a completed FUA request for its range). A qcow2 image keeps
    new clusters' L2 entries in the server's memory until a flush (QEMU's writeback metadata
    cache does the same): a kill -9 may lose a write whose reply came, as a power cut may;
    it may never bring back data older than the last durable point, nor data no request
    wrote. Sectors never touched are not kept: they hold the pre-image's data."""

    def __init__(self, pre: np.ndarray[Any, Any]) -> None:
        self.pre = pre
        self.now: dict[int, set[bytes]] = {}
        self.hist: dict[int, set[bytes]] = {}

    def _sector(self, s: int) -> bytes:
        return self.pre[s * SECTOR:(s + 1) * SECTOR].tobytes()

    def apply(self, step: Step, *, durable: bool | None = None) -> None:
        """A request that completed (``durable`` None: as its FUA flag says)."""
        op = step["op"]
        if op == "flush":
            if durable is not False:
                self.hist = {s: set(v) for s, v in self.now.items()}
            return
        off, n = step["off"], step["len"]
        fua = step.get("fua", False) if durable is None else durable
        for s in range(off // SECTOR, -(-(off + n) // SECTOR)):
            lo, hi = max(off, s * SECTOR) - s * SECTOR, min(off + n, (s + 1) * SECTOR) - s * SECTOR
            now = self.now.get(s) or {self._sector(s)}
            hist = self.hist.get(s) or {self._sector(s)}

            def put(v: bytes, piece: bytes = b"", lo: int = lo, hi: int = hi) -> bytes:
                return v[:lo] + (piece or bytes(hi - lo)) + v[hi:]

            if op == "write":
                piece = step["data"][s * SECTOR + lo - off:s * SECTOR + hi - off]
                after = {put(v, piece) for v in now}
            elif op == "zero":
                after = {put(v) for v in now}
            else:  # trim: as before, or zeros (whole clusters only: the rest as before)
                after = now | {put(v) for v in now}
            self.now[s] = after
            self.hist[s] = set(after) if fua and op != "trim" else hist | after

    def mismatches(self, got: np.ndarray[Any, Any]) -> list[int]:
        """Sectors of ``got`` that hold none of the values they may hold."""
        bad = (got.reshape(-1, SECTOR) != self.pre.reshape(-1, SECTOR)).any(axis=1)
        out = []
        for s in sorted(set(np.flatnonzero(bad).tolist()) | set(self.hist)):
            have = got[s * SECTOR:(s + 1) * SECTOR].tobytes()
            if have not in self.hist.get(s, {self._sector(s)}):
                out.append(s)
        return out


def run_step(c: nbd.Client, step: Step, cookie: int) -> nbd.Reply:
    """Send one request and wait for its reply (which must be a success)."""
    c.send(frame(c, step, cookie))
    reply = c.reply()
    assert reply.cookie == cookie and reply.error == 0, (describe(step), reply)
    return reply
