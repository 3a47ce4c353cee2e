"""QEMU's ``KEY=VALUE,...`` syntax (``util/keyval.c``) and its JSON reader, with no I/O.

``--blockdev`` (and ``-blockdev``) take either form, chosen by the first character::

    driver=qcow2,node-name=d0,file.driver=file,file.filename=a.qcow2     keyval
    {"driver": "qcow2", "node-name": "d0", "file": "f0"}                  JSON ('{' first)

keyval, as QEMU 7.2 reads it:

- ``key=value`` pairs split on single commas; ``,,`` is a literal comma in a value; one
  trailing comma is allowed;
- a dotted key (``file.driver``) names a member of a nested object, created on demand;
- a key fragment is a QAPI name (a letter first, then letters, digits, ``-``, ``_``; or a
  ``__RFQDN_`` prefix) or, after the first, a decimal index: an object whose keys are all
  indexes becomes a list (``a.0=x,a.1=y``), and the indexes must have no gaps;
- the last of repeated keys wins; every leaf is a string (the QAPI visitor converts it: see
  ``dirtybits.proto.qmp.schema``, ``keyval=True``);
- with an implied key (``driver`` for ``--blockdev``), a first item with no ``=`` is its value
  (``qcow2,file=...``), up to the first comma (no ``,,`` there);
- a bare ``help`` or ``?`` item asks for help, which ``--blockdev`` refuses.

Errors are ``QmpError`` with QEMU's text (the command line prints it after ``--blockdev:``);
the first one QEMU would report is the one raised, including the ones that depend on the order
QEMU keeps a dictionary in (``schema.qdict_order``).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from dirtybits.proto.qmp.core import QmpError
from dirtybits.proto.qmp.schema import qdict_order

INT_MAX = (1 << 31) - 1
MAX_FRAGMENT = 127  # bytes of one key fragment (key_in_cur[128])


def _isalpha(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _isalnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


def _qapi_name_len(s: str, pos: int) -> int:
    """``parse_qapi_name(s + pos, false)``: the length of the QAPI name at ``pos``, 0 if none."""
    p, n = pos, len(s)
    if p < n and s[p] == "_":  # downstream extension: __RFQDN_
        p += 1
        if p >= n or s[p] != "_":
            return 0
        p += 1
        while p < n and (_isalnum(s[p]) or s[p] in "-."):
            p += 1
        if p >= n or s[p] != "_":
            return 0
        p += 1
    if p >= n or not _isalpha(s[p]):
        return 0
    p += 1
    while p < n and (_isalnum(s[p]) or s[p] in "-_"):
        p += 1
    return p - pos


def _index_len(s: str, pos: int) -> int:
    """Length of the decimal list index at ``pos`` (``key_to_index`` with an end), 0 if none."""
    p = pos
    while p < len(s) and "0" <= s[p] <= "9":
        p += 1
    return p - pos


def _whole_index(key: str) -> int | None:
    """``key_to_index(key, NULL)``: the list index a whole key denotes (capped at INT_MAX)."""
    if not key or not key.isascii() or not key.isdigit():
        return None
    return min(int(key), INT_MAX)


def _fail(desc: str) -> QmpError:
    return QmpError(desc)


def _put(cur: dict[str, Any], key: str, value: str | None, errkey: str) -> Any:
    """``keyval_parse_put``: map ``key`` to ``value`` (a string) or to an object (None)."""
    old = cur.get(key)
    if old is not None:
        if isinstance(old, str) != (value is not None):
            raise _fail(f"Parameters '{errkey}.*' used inconsistently")
        if value is None:
            return old
    new: Any = {} if value is None else value
    cur[key] = new
    return new


def _parse_one(root: dict[str, Any], text: str, pos: int,
               implied_key: str | None) -> tuple[int, bool]:
    """One ``KEY=VALUE`` at ``pos``: (where the next one starts, whether it was ``help``)."""
    n = len(text)
    end = pos
    while end < n and text[end] not in "=,":
        end += 1
    length = end - pos
    implied = False
    if length and (end == n or text[end] != "="):
        word = text[pos:end]
        if word in ("help", "?"):
            return (end + 1 if end < n else end), True
        if implied_key:
            implied = True
    key = implied_key if implied and implied_key else text[pos:end]
    cur = root
    s = 0
    prev = ""
    while True:
        ln = _index_len(key, s) if s else 0
        if not ln:
            ln = _qapi_name_len(key, s)
        if not ln or (s + ln < len(key) and key[s + ln] != "."):
            raise _fail(f"Invalid parameter '{key}'")
        if ln > MAX_FRAGMENT:
            fragment = " fragment" if s or s + ln != len(key) else ""
            raise _fail(f"Parameter{fragment} '{key[s:s + ln]}' is too long")
        if s:
            cur = _put(cur, prev, None, key[:s - 1])
        prev = key[s:s + ln]
        s += ln
        if s >= len(key) or key[s] != ".":
            break
        s += 1
    if implied:
        value = text[pos:end]
        nxt = end + 1 if end < n else end
    else:
        if end >= n or text[end] != "=":
            raise _fail(f"Expected '=' after parameter '{key}'")
        chars: list[str] = []
        i = end + 1
        while i < n:
            if text[i] == ",":
                i += 1
                if i >= n or text[i] != ",":
                    break
            chars.append(text[i])
            i += 1
        value, nxt = "".join(chars), i
    _put(cur, prev, value, key)
    return nxt, False


def _listify_one(cur: dict[str, Any], path: str) -> dict[str, Any] | list[Any]:
    """``keyval_listify`` of one object whose members are done: the object, or the list it
    denotes when every key is an index."""
    has_index = has_member = False
    order = qdict_order(cur)
    for k in order:
        if _whole_index(k) is None:
            has_member = True
        else:
            has_index = True
    if has_index and has_member:
        raise _fail(f"Parameters '{path}*' used inconsistently")
    if not has_index:
        return cur
    nelt = len(cur) + 1
    elt: list[Any] = [None] * nelt
    max_index = -1
    for k in order:
        index = _whole_index(k)
        assert index is not None
        max_index = max(max_index, index)
        if index < nelt - 1:
            elt[index] = cur[k]
    out: list[Any] = []
    for i in range(min(nelt, max_index + 1)):
        if elt[i] is None:
            raise _fail(f"Parameter '{path}{i}' missing")
        out.append(elt[i])
    return out


def _listify(root: dict[str, Any]) -> None:
    """``keyval_listify``: objects whose keys are all indexes become lists, depth first in
    QEMU's dictionary order (which decides which of several problems is reported); without
    recursion, as keys may nest deeply."""
    # a frame: (object, its path, its keys in QDict order, how many of them are done)
    stack: list[tuple[dict[str, Any], str, list[str], list[int]]] = [
        (root, "", qdict_order(root), [0])]
    while stack:
        cur, path, order, done = stack[-1]
        if done[0] < len(order):
            k = order[done[0]]
            done[0] += 1
            v = cur[k]
            if isinstance(v, dict):
                stack.append((v, f"{path}{k}.", qdict_order(v), [0]))
            continue
        stack.pop()
        new = _listify_one(cur, path)
        if new is not cur:  # (never the root: its keys cannot be indexes)
            parent, _, _, pdone = stack[-1]
            parent[stack[-1][2][pdone[0] - 1]] = new


def _parse_items(text: str, implied_key: str | None) -> tuple[dict[str, Any], bool]:
    """Every ``KEY=VALUE`` of ``text`` (a C string: it ends at a NUL), before listification:
    the options and whether help was asked for."""
    text = text.split("\0", 1)[0]
    root: dict[str, Any] = {}
    pos, want_help = 0, False
    while pos < len(text):
        pos, asked = _parse_one(root, text, pos, implied_key)
        want_help = want_help or asked
        implied_key = None
    return root, want_help


def parse_help(text: str, implied_key: str | None = None) -> tuple[dict[str, Any], bool]:
    """``keyval_parse`` with help allowed: the nested options and whether ``help`` (or ``?``)
    was among them. Raises ``QmpError`` with QEMU's text, as ``parse``."""
    root, want_help = _parse_items(text, implied_key)
    _listify(root)
    return root, want_help


def parse(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """``keyval_parse(text, implied_key, NULL, errp)``: nested dicts (and lists) of strings.

    Raises ``QmpError`` with QEMU's text: ``Invalid parameter 'KEY'``, ``Expected '=' after
    parameter 'KEY'``, ``Parameters 'KEY.*' used inconsistently``, ``Parameter 'KEY.N'
    missing``, ``Parameter 'KEY' is too long``, ``Help is not available for this option``.
    """
    root, want_help = _parse_items(text, implied_key)
    if want_help:
        raise _fail("Help is not available for this option")
    _listify(root)
    return root


# ---------------------------------------------------------------------------- QEMU's JSON

# The lexer (qobject/json-lexer.c): states, token types, and a transition table over bytes.
_ERROR = 0
(_IN_RECOVERY, _IN_DQ, _IN_DQ_ESC, _IN_SQ, _IN_SQ_ESC, _IN_ZERO, _IN_EXP_DIGITS, _IN_EXP_SIGN,
 _IN_EXP_E, _IN_MANTISSA, _IN_MANTISSA_DIGITS, _IN_DIGITS, _IN_SIGN, _IN_KEYWORD,
 _IN_START) = range(1, 16)
(_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COLON, _COMMA, _INTEGER, _FLOAT, _KEYWORD, _STRING,
 _EOI) = range(100, 111)
_TOKENS = frozenset(range(100, 110))
_LOOKAHEAD = 0x1000

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10


def _lexer_table() -> dict[int, list[int]]:
    t = {s: [_ERROR] * 256 for s in range(1, 16)}

    def span(state: int, lo: int, hi: int, to: int) -> None:
        for c in range(lo, hi + 1):
            t[state][c] = to

    def terminal(state: int, token: int) -> None:
        span(state, 0, 255, token | _LOOKAHEAD)

    rec = t[_IN_RECOVERY]  # skip to a structural or control character, then start over
    span(_IN_RECOVERY, 0, 0x1F, _IN_START | _LOOKAHEAD)
    span(_IN_RECOVERY, 0x20, 0xFD, _IN_RECOVERY)
    span(_IN_RECOVERY, 0xFE, 0xFF, _IN_START | _LOOKAHEAD)
    rec[ord("\t")] = _IN_RECOVERY
    for ch in "[]{}:,":
        rec[ord(ch)] = _IN_START | _LOOKAHEAD
    for body, esc, quote in ((_IN_DQ, _IN_DQ_ESC, '"'), (_IN_SQ, _IN_SQ_ESC, "'")):
        span(esc, 0x20, 0xFD, body)
        span(body, 0x20, 0xFD, body)
        t[body][ord("\\")] = esc
        t[body][ord(quote)] = _STRING
    terminal(_IN_ZERO, _INTEGER)
    span(_IN_ZERO, ord("0"), ord("9"), _ERROR)
    t[_IN_ZERO][ord(".")] = _IN_MANTISSA
    terminal(_IN_EXP_DIGITS, _FLOAT)
    span(_IN_EXP_DIGITS, ord("0"), ord("9"), _IN_EXP_DIGITS)
    span(_IN_EXP_SIGN, ord("0"), ord("9"), _IN_EXP_DIGITS)
    t[_IN_EXP_E][ord("-")] = t[_IN_EXP_E][ord("+")] = _IN_EXP_SIGN
    span(_IN_EXP_E, ord("0"), ord("9"), _IN_EXP_DIGITS)
    terminal(_IN_MANTISSA_DIGITS, _FLOAT)
    span(_IN_MANTISSA_DIGITS, ord("0"), ord("9"), _IN_MANTISSA_DIGITS)
    t[_IN_MANTISSA_DIGITS][ord("e")] = t[_IN_MANTISSA_DIGITS][ord("E")] = _IN_EXP_E
    span(_IN_MANTISSA, ord("0"), ord("9"), _IN_MANTISSA_DIGITS)
    terminal(_IN_DIGITS, _INTEGER)
    span(_IN_DIGITS, ord("0"), ord("9"), _IN_DIGITS)
    t[_IN_DIGITS][ord("e")] = t[_IN_DIGITS][ord("E")] = _IN_EXP_E
    t[_IN_DIGITS][ord(".")] = _IN_MANTISSA
    t[_IN_SIGN][ord("0")] = _IN_ZERO
    span(_IN_SIGN, ord("1"), ord("9"), _IN_DIGITS)
    terminal(_IN_KEYWORD, _KEYWORD)
    span(_IN_KEYWORD, ord("a"), ord("z"), _IN_KEYWORD)
    start = t[_IN_START]
    start[ord('"')] = _IN_DQ
    start[ord("'")] = _IN_SQ
    start[ord("0")] = _IN_ZERO
    span(_IN_START, ord("1"), ord("9"), _IN_DIGITS)
    start[ord("-")] = _IN_SIGN
    for ch, tok in zip("{}[],:", (_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COMMA, _COLON),
                       strict=True):
        start[ord(ch)] = tok
    span(_IN_START, ord("a"), ord("z"), _IN_KEYWORD)
    for ch in " \t\r\n":
        start[ord(ch)] = _IN_START
    return t


_TABLE = _lexer_table()


def _lex(data: bytes) -> list[tuple[int, bytes]]:
    """The token stream (``JSON_ERROR`` tokens included) and the end of input."""
    out: list[tuple[int, bytes]] = []
    token = bytearray()
    state = _IN_START

    def step(ch: int, flush: bool) -> None:
        nonlocal state
        consumed = False
        while (state != _IN_START) if flush else not consumed:
            nxt = _TABLE[state][ch]
            consumed = not flush and not nxt & _LOOKAHEAD
            new = nxt & ~_LOOKAHEAD
            if consumed:
                token.append(ch)
            if new in _TOKENS:
                out.append((new, bytes(token)))
                token.clear()
                new = _IN_START
            elif new == _IN_START:
                token.clear()
            elif new == _ERROR:
                out.append((_ERROR, bytes(token)))
                token.clear()
                new = _IN_RECOVERY
            elif new == _IN_RECOVERY:
                token.clear()
            state = new

    for ch in data:
        step(ch, False)
    step(0, True)
    out.append((_EOI, b""))
    return out


class _JsonError(Exception):
    """The parser's first error (QEMU keeps the first and unwinds)."""


class _Parser:
    """``json_parser_parse`` over one balanced group of tokens, without recursion: QEMU's
    recursive descent, its containers on an explicit stack (nesting goes to 1024)."""

    def __init__(self, tokens: deque[tuple[int, bytes]]) -> None:
        self.tokens = tokens

    def parse(self) -> tuple[Any, str | None]:
        """(the value, None) or (None, QEMU's text for the first error)."""
        try:
            return self.value(), None
        except _JsonError as exc:
            return None, f"JSON parse error, {exc}"

    def peek(self) -> int | None:
        return self.tokens[0][0] if self.tokens else None

    def pop(self) -> int:
        """The next token's kind; premature EOI when there is none."""
        if not self.tokens:
            raise _JsonError("premature EOI")
        return self.tokens.popleft()[0]

    def value(self) -> Any:
        # a frame: [container, key] (key: None while an object awaits one, and for a list)
        stack: list[list[Any]] = []
        while True:
            value, is_string = self.scalar_or_open(stack)
            if value is _OPENED:
                continue
            while True:  # hand the value to the container it goes into
                if not stack:
                    return value
                frame = stack[-1]
                container = frame[0]
                if isinstance(container, list):
                    container.append(value)
                    kind = self.pop()
                    if kind == _RSQUARE:
                        value, is_string = stack.pop()[0], False
                        continue
                    if kind != _COMMA:
                        raise _JsonError("expected separator in list")
                    break
                if frame[1] is None:  # the key
                    if not is_string:
                        raise _JsonError("key is not a string in object")
                    if self.pop() != _COLON:
                        raise _JsonError("missing : in object pair")
                    frame[1] = value
                    break
                if frame[1] in container:
                    raise _JsonError("duplicate key")
                container[frame[1]] = value
                frame[1] = None
                kind = self.pop()
                if kind == _RCURLY:
                    value, is_string = stack.pop()[0], False
                    continue
                if kind != _COMMA:
                    raise _JsonError("expected separator in dict")
                if self.peek() is None:
                    raise _JsonError("premature EOI")
                break

    def scalar_or_open(self, stack: list[list[Any]]) -> tuple[Any, bool]:
        """The value starting here and whether it is a string; or ``_OPENED`` when it is a
        container with members to come, pushed on ``stack``."""
        kind = self.peek()
        if kind is None:
            raise _JsonError("premature EOI")
        if kind in (_LCURLY, _LSQUARE):
            self.tokens.popleft()
            close = _RCURLY if kind == _LCURLY else _RSQUARE
            nxt = self.peek()
            if nxt is None:
                raise _JsonError("premature EOI")
            container: dict[str, Any] | list[Any] = {} if kind == _LCURLY else []
            if nxt == close:
                self.tokens.popleft()
                return container, False
            stack.append([container, None])
            return _OPENED, False
        if kind == _KEYWORD:
            word = self.tokens.popleft()[1].decode()
            if word not in _KEYWORDS:
                raise _JsonError(f"invalid keyword '{word}'")
            return _KEYWORDS[word], False
        if kind == _STRING:
            return _string(self.tokens.popleft()[1]), True
        if kind == _INTEGER:  # int64, else uint64, else a double, as QEMU's QNum
            value = int(self.tokens.popleft()[1])
            if -(1 << 63) <= value < 1 << 64:
                return value, False
            return float(value), False
        if kind == _FLOAT:
            return float(self.tokens.popleft()[1]), False
        raise _JsonError("expecting value")


_OPENED = object()


def _string(text: bytes) -> str:
    """``parse_string``: a string token's value (QEMU's escapes, single quotes allowed)."""
    quote, i, n = text[0], 1, len(text)
    out: list[str] = []
    while text[i] != quote:
        if text[i] != 0x5C:  # not a backslash
            cp, i = _mod_utf8_codepoint(text, i)
            if cp < 0:
                raise _JsonError("invalid UTF-8 sequence in string")
            out.append(chr(cp))
            continue
        beg = i
        esc = text[i + 1]
        i += 2
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            continue
        if esc != ord("u"):
            raise _JsonError("invalid escape sequence in string")
        cp = _hex4(text, i)
        i += 4
        if 0xD800 <= cp <= 0xDBFF and text[i:i + 2] == b"\\u":  # a surrogate pair
            trailing = _hex4(text, i + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = (0x10000 + ((cp & 0x3FF) << 10)) | (trailing & 0x3FF)
                i += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            shown = text[beg:min(i, n)].decode("utf-8", "surrogateescape")
            raise _JsonError(f"{shown} is not a valid Unicode character")
        out.append(chr(cp))
    return "".join(out)


_KEYWORDS: dict[str, Any] = {"true": True, "false": False, "null": None}
_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX = b"0123456789abcdefABCDEF"


def _hex4(text: bytes, i: int) -> int:
    digits = text[i:i + 4]
    if len(digits) != 4 or any(c not in _HEX for c in digits):
        return -1
    return int(digits, 16)


def _valid_codepoint(cp: int) -> bool:
    """``is_valid_codepoint`` (util/unicode.c): no surrogates, no noncharacters."""
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _mod_utf8_codepoint(text: bytes, i: int) -> tuple[int, int]:
    """``mod_utf8_codepoint``: (code point or -1, index past the sequence)."""
    byte = text[i]
    i += 1
    if byte < 0x80:
        return byte, i
    if byte >= 0xFE or not byte & 0x40:
        return -1, i
    length, mask = 0, 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = text[i] if i < len(text) else 0
        if nxt & 0xC0 != 0x80:
            return -1, i
        i += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if not _valid_codepoint(cp) or (cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2)):
        return -1, i
    return cp, i


def from_json(text: str) -> Any:
    """``qobject_from_json``: QEMU's JSON (single-quoted strings allowed, duplicate keys not).

    Exactly one value is expected. Raises ``QmpError`` with QEMU's text (``JSON parse error,
    ...``, ``Expecting at most one JSON value``, the nesting and size limits)."""
    text = text.split("\0", 1)[0]
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    result: list[Any] = []
    err: list[str] = []

    def emit(value: Any, error: str | None) -> None:
        if result:
            result.clear()
            err.append("Expecting at most one JSON value")
        if err:
            return
        if error is not None:
            err.append(error)
        else:
            result.append(value)

    queue: deque[tuple[int, bytes]] = deque()
    brace = bracket = size = 0
    for kind, tok in _lex(data):
        error: str | None = None
        value: Any = None
        if kind == _ERROR:
            error = f"JSON parse error, stray '{tok.decode('utf-8', 'surrogateescape')}'"
        elif kind == _EOI:
            if not queue:
                continue
            value, error = _Parser(queue).parse()
        else:
            brace += (kind == _LCURLY) - (kind == _RCURLY)
            bracket += (kind == _LSQUARE) - (kind == _RSQUARE)
            if size + len(tok) + 1 > MAX_TOKEN_SIZE:
                error = "JSON token size limit exceeded"
            elif len(queue) + 1 > MAX_TOKEN_COUNT:
                error = "JSON token count limit exceeded"
            elif brace + bracket > MAX_NESTING:
                error = "JSON nesting depth limit exceeded"
            else:
                queue.append((kind, tok))
                size += len(tok)
                if (brace > 0 or bracket > 0) and brace >= 0 and bracket >= 0:
                    continue
                value, error = _Parser(queue).parse()
        brace = bracket = size = 0
        queue = deque()
        emit(value, error)
    if err:
        raise _fail(err[0])
    if not result:
        raise _fail("JSON parse error, premature EOI")  # empty input (QEMU: no value at all)
    return result[0]


def parse_blockdev(text: str) -> dict[str, Any]:
    """A ``--blockdev`` argument, as ``qemu-storage-daemon --blockdev`` reads it: JSON when it
    starts with ``{`` (an object), keyval otherwise (``driver`` implied); then the options
    checked (``dirtybits.proto.qmp.blockdev.blockdev_options``), nested dicts of typed values.

    Raises ``QmpError`` with QEMU's text for the first problem."""
    from dirtybits.proto.qmp.blockdev import blockdev_options

    if text.startswith("{"):
        obj = from_json(text)
        assert isinstance(obj, dict)
        return blockdev_options(obj)
    return blockdev_options(parse(text, "driver"), keyval=True)


__all__ = ["from_json", "parse", "parse_blockdev", "parse_help"]
