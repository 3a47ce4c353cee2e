"""The NBD protocol cores, paired in memory: the client core's frames into the server core,
the server's bytes back into the client core. No sockets, no block layer."""

from __future__ import annotations

import struct

import pytest

from dirtybits.proto.nbd import status, wire
from dirtybits.proto.nbd.client import (
    Chunk,
    ClientConnection,
    ExportNameReply,
    Greeting,
    OptionReply,
    SimpleReply,
)
from dirtybits.proto.nbd.constants import (
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_MAX_BLOCK_STATUS_EXTENTS,
    NBD_REPLY_FLAG_DONE,
    NBD_STATE_DIRTY,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Option,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from dirtybits.proto.nbd.server import (
    BadRequest,
    Close,
    ExportView,
    Phase,
    Ready,
    RequestEvent,
    ServerConnection,
    StartTls,
    TlsMode,
)

TF = TransmissionFlag
FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
RO = TF.NBD_FLAG_HAS_FLAGS | TF.NBD_FLAG_READ_ONLY | TF.NBD_FLAG_SEND_FLUSH


class Catalog:
    def __init__(self, *exports: ExportView) -> None:
        self.exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportView | None:
        return self.exports.get(name)

    def listing(self) -> list[ExportView]:
        return list(self.exports.values())


DISK = ExportView("disk", 1 << 20, RO, description="a disk", allocation_depth=True,
                  bitmaps=("b0", "b1"))
RW = ExportView("rw", 1 << 20, TF.NBD_FLAG_HAS_FLAGS | TF.NBD_FLAG_SEND_WRITE_ZEROES)


class Pair:
    """A client core wired to a server core; ``send`` moves bytes, ``events`` collects."""

    def __init__(self, *exports: ExportView, tls: TlsMode = TlsMode.OFF,
                 flags: int = FLAGS) -> None:
        self.server = ServerConnection(Catalog(*(exports or (DISK, RW))), tls=tls)
        self.client = ClientConnection()
        self.flow()
        assert self.client_events() == [Greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)]
        self.send(self.client.client_flags(flags))

    def send(self, data: bytes, *, bytewise: bool = False) -> list[object]:
        if bytewise:
            for i in range(len(data)):
                self.server.receive_data(data[i:i + 1])
        else:
            self.server.receive_data(data)
        events = []
        while (ev := self.server.next_event()) is not None:
            events.append(ev)
        self.flow()
        return events

    def flow(self) -> None:
        self.client.receive_data(self.server.data_to_send())

    def client_events(self) -> list[object]:
        out = []
        while (ev := self.client.next_event()) is not None:
            out.append(ev)
        return out

    def option(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        self.send(self.client.option(opt, data))
        evs = self.client_events()
        assert all(isinstance(e, OptionReply) for e in evs)
        return evs  # type: ignore[return-value]

    def go(self, name: str = "disk", *, structured: bool = True,
           contexts: tuple[str, ...] = ()) -> Ready:
        if structured:
            assert self.option(Option.NBD_OPT_STRUCTURED_REPLY)[0].rep == Rep.NBD_REP_ACK
        if contexts:
            self.option(Option.NBD_OPT_SET_META_CONTEXT, meta(name, *contexts))
        events = self.send(self.client.option(Option.NBD_OPT_GO, info_req(name)))
        assert self.client_events()[-1].rep == Rep.NBD_REP_ACK  # type: ignore[attr-defined]
        self.client.transmission(structured)
        (ready,) = events
        assert isinstance(ready, Ready)
        return ready


def info_req(name: str, *infos: int) -> bytes:
    return wire.info_request(name, *infos)


def meta(name: str, *queries: str) -> bytes:
    return wire.meta_request(name, queries)


def text(reply: OptionReply) -> str:
    return reply.data.decode()


# ------------------------------------------------------------------------------ negotiation
def test_unknown_client_flags_close_the_connection() -> None:
    p = Pair.__new__(Pair)
    p.server = ServerConnection(Catalog(DISK))
    p.client = ClientConnection()
    p.flow()
    (ev,) = p.send(struct.pack(">I", 0x80))
    assert ev == Close("Unknown client flags 0x80 received")
    assert p.server.phase is Phase.CLOSED


def test_list_names_every_export_with_its_description() -> None:
    p = Pair()
    replies = p.option(Option.NBD_OPT_LIST)
    assert [r.rep for r in replies] == [Rep.NBD_REP_SERVER, Rep.NBD_REP_SERVER, Rep.NBD_REP_ACK]
    assert replies[0].data == struct.pack(">I", 4) + b"disk" + b"a disk"
    assert replies[1].data == struct.pack(">I", 2) + b"rw"
    # LIST takes no data
    (bad,) = p.option(Option.NBD_OPT_LIST, b"x")
    assert bad.rep == Rep.NBD_REP_ERR_INVALID
    assert text(bad) == "option 'list' has unexpected length"


def test_info_and_go_reply_in_qemus_order() -> None:
    p = Pair()
    replies = p.option(Option.NBD_OPT_INFO, info_req(
        "disk", Info.NBD_INFO_DESCRIPTION, Info.NBD_INFO_NAME))
    kinds = [struct.unpack_from(">H", r.data)[0] for r in replies[:-1]]
    assert kinds == [Info.NBD_INFO_NAME, Info.NBD_INFO_DESCRIPTION, Info.NBD_INFO_BLOCK_SIZE,
                     Info.NBD_INFO_EXPORT]
    assert replies[-1].rep == Rep.NBD_REP_ACK
    size, flags = struct.unpack_from(">QH", replies[3].data, 2)
    assert (size, flags) == (1 << 20, RO)  # no DF: structured replies not negotiated
    assert p.server.phase is Phase.OPTIONS  # INFO does not end negotiation
    (missing, *_) = p.option(Option.NBD_OPT_INFO, info_req("nope"))
    assert missing.rep == Rep.NBD_REP_ERR_UNKNOWN
    assert text(missing) == "export 'nope' not present"
    (trailing,) = p.option(Option.NBD_OPT_GO, info_req("disk") + b"\0")
    assert trailing.rep == Rep.NBD_REP_ERR_INVALID
    ready = p.go("disk")
    assert ready.export is DISK and ready.structured and ready.contexts == ()


def test_go_advertises_df_only_with_structured_replies() -> None:
    p = Pair()
    p.send(p.client.option(Option.NBD_OPT_STRUCTURED_REPLY))
    p.client_events()
    replies = p.option(Option.NBD_OPT_INFO, info_req("disk"))
    _, flags = struct.unpack_from(">QH", replies[-2].data, 2)
    assert flags == RO | TF.NBD_FLAG_SEND_DF
    (again,) = p.option(Option.NBD_OPT_STRUCTURED_REPLY)
    assert (again.rep, text(again)) == (Rep.NBD_REP_ERR_INVALID,
                                        "structured reply already negotiated")


def test_export_name_of_an_unknown_export_disconnects() -> None:
    p = Pair()
    (ev,) = p.send(p.client.option(Option.NBD_OPT_EXPORT_NAME, b"nope"))
    assert ev == Close("export 'nope' not present")


def test_export_name_replies_size_and_flags() -> None:
    p = Pair(flags=NBD_FLAG_C_FIXED_NEWSTYLE)  # no NO_ZEROES: 124 bytes of padding follow
    (ready,) = p.send(p.client.option(Option.NBD_OPT_EXPORT_NAME, b"disk"))
    assert isinstance(ready, Ready) and not ready.structured
    assert p.client_events() == [ExportNameReply(1 << 20, RO)]


def test_meta_contexts_need_structured_replies() -> None:
    p = Pair()
    (bad,) = p.option(Option.NBD_OPT_SET_META_CONTEXT, meta("disk", "base:allocation"))
    assert bad.rep == Rep.NBD_REP_ERR_INVALID
    assert text(bad) == ("request option 'set meta context' when structured reply is not "
                         "negotiated")


def _contexts(replies: list[OptionReply]) -> list[tuple[int, str]]:
    assert replies[-1].rep == Rep.NBD_REP_ACK
    return [(struct.unpack_from(">I", r.data)[0], r.data[4:].decode()) for r in replies[:-1]]


def test_list_meta_context_queries_select_namespaces_with_id_zero() -> None:
    p = Pair()
    p.option(Option.NBD_OPT_STRUCTURED_REPLY)
    every = [(0, "base:allocation"), (0, "qemu:allocation-depth"),
             (0, "qemu:dirty-bitmap:b0"), (0, "qemu:dirty-bitmap:b1")]
    assert _contexts(p.option(Option.NBD_OPT_LIST_META_CONTEXT, meta("disk"))) == every
    assert _contexts(p.option(Option.NBD_OPT_LIST_META_CONTEXT, meta("disk", "qemu:"))) == \
        every[1:]
    assert _contexts(p.option(Option.NBD_OPT_LIST_META_CONTEXT,
                              meta("disk", "qemu:dirty-bitmap:", "base:"))) == \
        [every[0], *every[2:]]
    assert _contexts(p.option(Option.NBD_OPT_LIST_META_CONTEXT,
                              meta("disk", "other:thing", "qemu:dirty-bitmap:nope"))) == []


def test_set_meta_context_selects_exact_names_with_qemus_ids() -> None:
    p = Pair()
    p.option(Option.NBD_OPT_STRUCTURED_REPLY)
    chosen = _contexts(p.option(Option.NBD_OPT_SET_META_CONTEXT, meta(
        "disk", "qemu:dirty-bitmap:b1", "qemu:", "base:allocation")))
    assert chosen == [(0, "base:allocation"), (3, "qemu:dirty-bitmap:b1")]
    ready = p.go("disk", structured=False)
    assert ready.contexts == ((0, "base:allocation"), (3, "qemu:dirty-bitmap:b1"))


def test_contexts_set_for_another_export_do_not_apply() -> None:
    p = Pair()
    p.option(Option.NBD_OPT_STRUCTURED_REPLY)
    p.option(Option.NBD_OPT_SET_META_CONTEXT, meta("disk", "base:allocation"))
    assert p.go("rw", structured=False).contexts == ()


def test_tls_required_refuses_options_before_starttls() -> None:
    p = Pair(tls=TlsMode.REQUIRED)
    (refused,) = p.option(Option.NBD_OPT_LIST)
    assert (refused.rep, text(refused)) == (Rep.NBD_REP_ERR_TLS_REQD,
                                            "Option 0x3 not permitted before TLS")
    events = p.send(p.client.option(Option.NBD_OPT_STARTTLS))
    assert events == [StartTls()]
    assert p.client_events()[0].rep == Rep.NBD_REP_ACK  # type: ignore[attr-defined]
    assert p.server.phase is Phase.TLS
    p.server.tls_established()
    assert p.option(Option.NBD_OPT_LIST)[-1].rep == Rep.NBD_REP_ACK
    (again,) = p.option(Option.NBD_OPT_STARTTLS)
    assert (again.rep, text(again)) == (Rep.NBD_REP_ERR_INVALID, "TLS already enabled")


def test_tls_required_disconnects_export_name_and_off_refuses_starttls() -> None:
    p = Pair(tls=TlsMode.REQUIRED)
    (ev,) = p.send(p.client.option(Option.NBD_OPT_EXPORT_NAME, b"disk"))
    assert ev == Close("Option 0x1 not permitted before TLS")
    q = Pair()
    (policy,) = q.option(Option.NBD_OPT_STARTTLS)
    assert (policy.rep, text(policy)) == (Rep.NBD_REP_ERR_POLICY, "TLS not configured")


def test_unknown_and_oversized_options_get_errors_and_negotiation_goes_on() -> None:
    p = Pair()
    (unsup,) = p.option(99, b"abc")
    assert unsup.rep == Rep.NBD_REP_ERR_UNSUP
    big = p.option(Option.NBD_OPT_LIST_META_CONTEXT, bytes(200_000))
    assert [r.rep for r in big] == [Rep.NBD_REP_ERR_TOO_BIG]
    assert len(p.server._in) == 0  # drained, never buffered whole
    assert p.option(Option.NBD_OPT_LIST)[-1].rep == Rep.NBD_REP_ACK


def test_oversized_options_without_an_option_reply_close() -> None:
    """EXPORT_NAME has no option reply, nor has any option of a client that is not fixed
    newstyle: an oversized one closes instead of being drained and answered."""
    p = Pair()
    (ev,) = p.send(p.client.option(Option.NBD_OPT_EXPORT_NAME, bytes(70_000)))
    assert ev == Close("Bad length received")
    assert p.client_events() == []
    q = Pair(flags=NBD_FLAG_C_NO_ZEROES)
    (ev,) = q.send(q.client.option(Option.NBD_OPT_LIST, bytes(70_000)))
    assert ev == Close("Unsupported option 3 (not fixed newstyle)")
    assert q.client_events() == []


def test_abort_acknowledges_and_closes() -> None:
    p = Pair()
    events = p.send(p.client.option(Option.NBD_OPT_ABORT))
    assert events == [Close("the client aborted negotiation", error=False)]
    assert p.client_events()[0].rep == Rep.NBD_REP_ACK  # type: ignore[attr-defined]


def test_bad_option_magic_closes() -> None:
    p = Pair()
    (ev,) = p.send(struct.pack(">QII", 0x1234, 3, 0))
    assert isinstance(ev, Close) and ev.error and "Bad magic" in ev.reason


# ------------------------------------------------------------------------------ transmission
def test_requests_are_parsed_whole_whatever_the_segmentation() -> None:
    p = Pair()
    p.go("rw", structured=True)
    frames = (p.client.request(Cmd.NBD_CMD_WRITE, 7, 4096, 3, CmdFlag.NBD_CMD_FLAG_FUA,
                               b"abc")
              + p.client.request(Cmd.NBD_CMD_READ, 8, 0, 512))
    events = p.send(frames, bytewise=True)
    assert [(e.cmd, e.cookie, e.offset, e.length) for e in events] == [  # type: ignore[union-attr]
        (Cmd.NBD_CMD_WRITE, 7, 4096, 3), (Cmd.NBD_CMD_READ, 8, 0, 512)]
    write = events[0]
    assert isinstance(write, RequestEvent) and bytes(write.payload or b"") == b"abc"
    assert write.flags == CmdFlag.NBD_CMD_FLAG_FUA


def test_a_write_payload_is_received_into_its_own_buffer() -> None:
    """The I/O layer may receive a WRITE's payload straight into the buffer the core hands
    out (``receive_into``), in any pieces, mixed with ``receive_data``: the same events."""
    p = Pair()
    p.go("rw")
    payload = bytes(range(256)) * 64
    frames = (p.client.request(Cmd.NBD_CMD_WRITE, 1, 0, len(payload), 0, payload)
              + p.client.request(Cmd.NBD_CMD_FLUSH, 2))
    core = p.server
    core.receive_data(frames[:28 + 100])  # the header and the payload's start
    assert core.next_event() is None
    pos = 28 + 100
    for step in (1, 999, 5000):
        target = core.receive_into()
        assert target is not None
        n = min(step, len(target))
        target[:n] = frames[pos:pos + n]
        core.received_into(n)
        pos += n
    core.receive_data(frames[pos:])  # the payload's end and the next request together
    events = []
    while (ev := core.next_event()) is not None:
        events.append(ev)
    assert [(e.cmd, e.cookie) for e in events] == [(Cmd.NBD_CMD_WRITE, 1),  # type: ignore[union-attr]
                                                   (Cmd.NBD_CMD_FLUSH, 2)]
    assert bytes(events[0].payload) == payload  # type: ignore[union-attr, arg-type]
    assert core.receive_into() is None
    q = Pair()
    q.go("rw")
    q.server.receive_data(frames[:200])
    q.server.receive_data(b"")
    assert q.server.next_event() == Close(
        "the client disconnected in the middle of a frame (200 bytes pending)")


@pytest.mark.parametrize(("cmd", "offset", "length", "flags", "error", "message"), [
    (Cmd.NBD_CMD_READ, 1 << 20, 1, 0, Errno.NBD_EINVAL,
     "operation past EOF; From: 1048576, Len: 1, Size: 1048576"),
    (Cmd.NBD_CMD_WRITE_ZEROES, (1 << 20) - 1, 2, 0, Errno.NBD_ENOSPC,
     "operation past EOF; From: 1048575, Len: 2, Size: 1048576"),
    (Cmd.NBD_CMD_READ, 0, 33 << 20, 0, Errno.NBD_EINVAL,
     "len (34603008) is larger than max len (33554432)"),
    (Cmd.NBD_CMD_FLUSH, 0, 0, CmdFlag.NBD_CMD_FLAG_REQ_ONE, Errno.NBD_EINVAL,
     "unsupported flags for command flush (got 0x8)"),
    # bits the protocol does not define at all (IntFlag's ~ alone would let them through)
    (Cmd.NBD_CMD_READ, 0, 512, 0x20, Errno.NBD_EINVAL,
     "unsupported flags for command read (got 0x20)"),
    (Cmd.NBD_CMD_WRITE_ZEROES, 0, 512, 0x8001, Errno.NBD_EINVAL,
     "unsupported flags for command write zeroes (got 0x8001)"),
    (Cmd.NBD_CMD_BLOCK_STATUS, 0, 0, 0, Errno.NBD_EINVAL, "need non-zero length"),
    (Cmd.NBD_CMD_BLOCK_STATUS, 0, 512, 0, Errno.NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated"),
    (42, 0, 0, 0, Errno.NBD_EINVAL, "invalid request type (42) received"),
])
def test_bad_requests_get_qemus_errors_and_the_connection_goes_on(
        cmd: int, offset: int, length: int, flags: int, error: Errno, message: str) -> None:
    p = Pair()
    p.go("rw", structured=True)
    (bad,) = p.send(p.client.request(cmd, 5, offset, length, flags))
    assert bad == BadRequest(5, error, message)
    (ok,) = p.send(p.client.request(Cmd.NBD_CMD_FLUSH, 6))
    assert isinstance(ok, RequestEvent) and ok.cookie == 6


def test_writes_to_a_read_only_export_are_refused() -> None:
    p = Pair()
    p.go("disk", structured=False)
    for cmd in (Cmd.NBD_CMD_WRITE, Cmd.NBD_CMD_TRIM, Cmd.NBD_CMD_WRITE_ZEROES):
        payload = b"x" if cmd == Cmd.NBD_CMD_WRITE else b""
        (bad,) = p.send(p.client.request(cmd, 1, 0, len(payload) or 512, payload=payload))
        assert bad == BadRequest(1, Errno.NBD_EPERM, "Export is read-only")


def test_an_oversized_write_is_fatal() -> None:
    p = Pair()
    p.go("rw")
    (bad,) = p.send(p.client.request(Cmd.NBD_CMD_WRITE, 3, 0, 64 << 20))
    assert isinstance(bad, BadRequest) and bad.fatal and bad.error == Errno.NBD_EINVAL
    assert p.server.phase is Phase.CLOSED


def test_bad_request_magic_and_disc_close() -> None:
    p = Pair()
    p.go("rw")
    (ev,) = p.send(b"\0" * 28)
    assert isinstance(ev, Close) and ev.error
    q = Pair()
    q.go("rw")
    (disc,) = q.send(q.client.request(Cmd.NBD_CMD_DISC, 1))
    assert disc == Close("the client sent NBD_CMD_DISC", error=False)


def test_eof_mid_frame_is_an_error_and_between_frames_is_not() -> None:
    p = Pair()
    p.go("rw")
    (ev,) = p.send(p.client.request(Cmd.NBD_CMD_READ, 1, 0, 1)[:10] or b"") or [None]
    assert ev is None
    p.server.receive_data(b"")
    assert p.server.next_event() == Close(
        "the client disconnected in the middle of a frame (10 bytes pending)")
    q = Pair()
    q.go("rw")
    q.server.receive_data(b"")
    assert q.server.next_event() == Close("the client disconnected", error=False)


def test_replies_parse_back_in_the_client_core() -> None:
    p = Pair()
    p.go("rw", structured=False)
    p.client.request(Cmd.NBD_CMD_READ, 9, 0, 4)
    buf = bytearray(p.server.read_header_size() + 4)
    buf[-4:] = b"data"
    p.server.pack_read_header(buf, 9, 0, 4)
    p.client.receive_data(bytes(buf) + p.server.reply_error(10, Errno.NBD_EIO, "boom"))
    assert p.client_events() == [SimpleReply(9, 0, b"data"), SimpleReply(10, Errno.NBD_EIO)]
    s = Pair()
    s.go("disk", contexts=("base:allocation",))
    s.client.receive_data(s.server.hole(4, 0, 512, final=False)
                          + s.server.block_status(4, 0, status.pack([(512, 3)]), final=True)
                          + s.server.reply_error(5, Errno.NBD_EPERM, "no"))
    evs = s.client_events()
    assert evs[0] == Chunk(4, 0, ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE,
                           struct.pack(">QI", 0, 512))
    assert evs[1] == Chunk(4, NBD_REPLY_FLAG_DONE, ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS,
                           struct.pack(">III", 0, 512, 3))
    assert evs[2] == Chunk(5, NBD_REPLY_FLAG_DONE, ReplyType.NBD_REPLY_TYPE_ERROR,
                           struct.pack(">IH", Errno.NBD_EPERM, 2) + b"no")


# ------------------------------------------------------------------------------ extents
def test_dirty_extents_alternate_clip_and_merge() -> None:
    d = NBD_STATE_DIRTY
    runs = [(0, 64), (64, 64), (256, 64)]  # two touching runs merge
    assert status.from_dirty(runs, 0, 512) == [(128, d), (128, 0), (64, d), (192, 0)]
    assert status.from_dirty(runs, 32, 300) == [(96, d), (128, 0), (64, d), (12, 0)]
    assert status.from_dirty(runs, 130, 100) == [(100, 0)]
    assert status.from_dirty(runs, 0, 512, req_one=True) == [(128, d)]
    assert status.from_dirty([], 7, 9) == [(9, 0)]


def test_allocation_extents_clip_merge_and_cap() -> None:
    runs = [(0, 100, 0), (100, 50, 0), (150, 50, 3), (200, 1000, 0)]
    assert status.from_runs(runs, 10, 200) == [(140, 0), (50, 3), (10, 0)]
    assert status.from_runs(runs, 10, 200, req_one=True) == [(140, 0)]
    many = [(i, 1, i % 2) for i in range(NBD_MAX_BLOCK_STATUS_EXTENTS + 10)]
    out = status.from_runs(many, 0, len(many))
    assert len(out) == NBD_MAX_BLOCK_STATUS_EXTENTS  # a short reply, never an overlong one


@pytest.mark.parametrize("seed", range(40))
def test_extents_from_run_arrays_equal_the_per_run_rules(seed: int) -> None:
    """``status.window`` (numpy, from a bitmap's run ends) against ``from_dirty`` (one Python
    step per run, QEMU's ``bitmap_to_extents``): the same packed extents for random bitmaps,
    windows (at run edges, inside runs, at the end), REQ_ONE and the extent cap."""
    import random

    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

    rng = random.Random(seed)
    gran = 1 << rng.choice((9, 12, 16))
    size = gran * rng.randrange(1, 3000)
    bm = DirtyBitmap(size, gran)
    for _ in range(rng.randrange(0, 60)):
        off = rng.randrange(size)
        bm.set(off, min(size - off, rng.randrange(1, max(2, size // 8))))
    dirty = list(bm.dirty_extents())
    first, edges = bm.run_edges()
    for _ in range(30):
        off = rng.choice((0, rng.randrange(size), *(e for e, _ in dirty[:1])))
        length = rng.choice((size - off, rng.randrange(1, size - off + 1), 1))
        req_one = rng.random() < 0.2
        want = status.pack(status.from_dirty(dirty, off, length, req_one=req_one))
        assert status.window(first, edges, off, length, req_one=req_one) == want
        f2, e2 = bm.run_edges(off, length)  # the window read alone
        assert status.window(f2, e2, off, length, req_one=req_one) == want
    many = DirtyBitmap(512 * 300_000, 512)
    for i in range(0, 300_000, 2):
        many.set(i * 512, 512)
    f3, e3 = many.run_edges()
    packed = status.window(f3, e3, 0, 512 * 300_000)
    assert len(packed) == 8 * NBD_MAX_BLOCK_STATUS_EXTENTS


def test_wire_layouts_have_the_specs_sizes() -> None:
    assert (wire.GREETING.size, wire.OPTION.size, wire.OPTION_REPLY.size, wire.REQUEST.size,
            wire.SIMPLE_REPLY.size, wire.CHUNK.size, wire.CHUNK_DATA.size) == \
        (18, 16, 20, 28, 16, 20, 28)


def test_tls_allowed_offers_starttls_and_takes_plaintext_too() -> None:
    p = Pair(tls=TlsMode.ALLOWED)
    assert p.option(Option.NBD_OPT_LIST)[-1].rep == Rep.NBD_REP_ACK  # no TLS needed
    assert p.send(p.client.option(Option.NBD_OPT_STARTTLS)) == [StartTls()]
    p.server.tls_established()
    assert p.go("disk").export is DISK
