"""SPDY/3.1 framing, sans-I/O: what kubectl up to 1.29 speaks for exec, attach
and port-forward (and every kubectl for port-forward, KUBE-API.md).

PyPI has no maintained SPDY library (the few packages are SPDY/2 or abandoned
since 2013), so the framing is written here from the SPDY/3.1 draft, like h11
and wsproto: bytes in (`receive_data`), frames out (`events`), and methods
that return the bytes of a frame to send. Moving the bytes is the caller's.

Frames (draft 3.1, section 2.2): a control frame starts with the bit C=1, a
15-bit version (3) and a 16-bit type; a data frame with C=0 and the 31-bit
stream id. Both then carry 8 bits of flags (FIN 0x01, UNIDIRECTIONAL 0x02) and
a 24-bit length. Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are a count and
length-prefixed names and values, compressed with ONE zlib stream per direction
for the whole connection, seeded with the SPDY/3 dictionary (section 2.6.10.1)
and sync-flushed after each block.

Flow control (WINDOW_UPDATE) is parsed and otherwise ignored, as kubectl's
SPDY library (moby/spdystream) ignores it too.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

VERSION = 3
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
MAX_FRAME = 0xFFFFFF            # a 24-bit length
MAX_HEADER_BLOCK = 1 << 20      # a decompressed header block larger than this is refused

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9

# RST_STREAM status codes (2.6.3)
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL, INTERNAL_ERROR, STREAM_ALREADY_CLOSED = 1, 2, 3, 5, 6, 9

_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base content-encoding "
    "content-language content-length content-location content-md5 content-range content-type date etag "
    "expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since "
    "last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer "
    "retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate "
    "method get status").split() + ["200 OK"] + "version HTTP/1.1 url public set-cookie keep-alive origin".split()
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
# The SPDY/3 header dictionary: each word with its 32-bit length, then the tail.
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()


class ProtocolError(Exception):
    """The peer broke SPDY/3.1; the connection cannot go on."""


@dataclasses.dataclass
class Data:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclasses.dataclass
class SynStream:
    stream_id: int
    headers: dict[str, str]         # lower-case names; several values joined with ", "
    fin: bool = False
    associated_id: int = 0
    priority: int = 0


@dataclasses.dataclass
class SynReply:
    stream_id: int
    headers: dict[str, str]
    fin: bool = False


@dataclasses.dataclass
class Headers:
    stream_id: int
    headers: dict[str, str]
    fin: bool = False


@dataclasses.dataclass
class RstStream:
    stream_id: int
    status: int


@dataclasses.dataclass
class Settings:
    entries: dict[int, int]


@dataclasses.dataclass
class Ping:
    ping_id: int


@dataclasses.dataclass
class GoAway:
    last_stream_id: int
    status: int = 0


@dataclasses.dataclass
class WindowUpdate:
    stream_id: int
    delta: int


Event = Data | SynStream | SynReply | Headers | RstStream | Settings | Ping | GoAway | WindowUpdate


def encode_header_block(headers: dict[str, str] | list[tuple[str, str]]) -> bytes:
    """The uncompressed name/value block (2.6.10): names lower-case, values of a
    repeated name joined with NUL."""
    merged: dict[str, list[str]] = {}
    for name, value in (headers.items() if isinstance(headers, dict) else headers):
        merged.setdefault(name.lower(), []).append(value)
    out = [struct.pack(">I", len(merged))]
    for name, values in merged.items():
        n, v = name.encode(), "\0".join(values).encode()
        out += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
    return b"".join(out)


def decode_header_block(block: bytes) -> dict[str, str]:
    def take(at: int, n: int) -> tuple[bytes, int]:
        if at + n > len(block):
            raise ProtocolError("a header block ends inside a name or value")
        return block[at:at + n], at + n

    raw, at = take(0, 4)
    count = struct.unpack(">I", raw)[0]
    headers: dict[str, str] = {}
    for _ in range(count):
        raw, at = take(at, 4)
        name, at = take(at, struct.unpack(">I", raw)[0])
        raw, at = take(at, 4)
        value, at = take(at, struct.unpack(">I", raw)[0])
        if not name:
            raise ProtocolError("a header block has an empty name")
        key = name.decode("latin-1").lower()
        joined = ", ".join(value.decode("latin-1").split("\0"))
        headers[key] = f"{headers[key]}, {joined}" if key in headers else joined
    return headers


class Connection:
    """One side of a SPDY/3.1 connection (the server's, or a client's in tests)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 15, zdict=DICTIONARY)

    # -- reading ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def events(self) -> list[Event]:
        """Every whole frame received so far; raises ProtocolError on a broken one."""
        out: list[Event] = []
        while len(self._buf) >= 8:
            length = int.from_bytes(self._buf[5:8], "big")
            if len(self._buf) < 8 + length:
                break
            head, payload = bytes(self._buf[:8]), bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            event = self._frame(head, payload)
            if event is not None:
                out.append(event)
        return out

    def _headers(self, compressed: bytes) -> dict[str, str]:
        try:
            block = self._inflate.decompress(compressed, MAX_HEADER_BLOCK)
        except zlib.error as err:
            raise ProtocolError(f"cannot decompress a header block: {err}") from None
        if self._inflate.unconsumed_tail:
            raise ProtocolError(f"a header block is larger than {MAX_HEADER_BLOCK} bytes")
        return decode_header_block(block)

    def _frame(self, head: bytes, payload: bytes) -> Event | None:
        flags = head[4]
        fin = bool(flags & FLAG_FIN)
        if not head[0] & 0x80:
            return Data(int.from_bytes(head[:4], "big") & 0x7FFFFFFF, payload, fin)
        version, type_ = struct.unpack(">HH", head[:4])
        version &= 0x7FFF
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version} is not spoken here (only {VERSION})")

        def need(n: int) -> None:
            if len(payload) < n:
                raise ProtocolError(f"control frame type {type_} is {len(payload)} bytes, shorter than {n}")

        if type_ == SYN_STREAM:
            need(10)
            sid, assoc = struct.unpack(">II", payload[:8])
            return SynStream(sid & 0x7FFFFFFF, self._headers(payload[10:]), fin, assoc & 0x7FFFFFFF,
                             payload[8] >> 5)
        if type_ in (SYN_REPLY, HEADERS):
            need(4)
            sid = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            return (SynReply if type_ == SYN_REPLY else Headers)(sid, self._headers(payload[4:]), fin)
        if type_ == RST_STREAM:
            need(8)
            sid, code = struct.unpack(">II", payload[:8])
            return RstStream(sid & 0x7FFFFFFF, code)
        if type_ == SETTINGS:
            need(4)
            count = struct.unpack(">I", payload[:4])[0]
            need(4 + 8 * count)
            entries = {}
            for i in range(count):
                id_, value = struct.unpack(">II", payload[4 + 8 * i:12 + 8 * i])
                entries[id_ & 0xFFFFFF] = value
            return Settings(entries)
        if type_ == PING:
            need(4)
            return Ping(struct.unpack(">I", payload[:4])[0])
        if type_ == GOAWAY:
            need(4)
            sid = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            return GoAway(sid, struct.unpack(">I", payload[4:8])[0] if len(payload) >= 8 else 0)
        if type_ == WINDOW_UPDATE:
            need(8)
            sid, delta = struct.unpack(">II", payload[:8])
            return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF)
        return None                     # NOOP and unknown control frames are ignored (2.2.1)

    # -- writing ----------------------------------------------------------------------

    @staticmethod
    def _control(type_: int, flags: int, payload: bytes) -> bytes:
        if len(payload) > MAX_FRAME:
            raise ValueError(f"a control frame of {len(payload)} bytes is over SPDY's {MAX_FRAME}")
        return struct.pack(">HHI", 0x8000 | VERSION, type_, (flags << 24) | len(payload)) + payload

    def _compress(self, headers) -> bytes:
        return self._deflate.compress(encode_header_block(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def syn_stream(self, stream_id: int, headers, fin: bool = False) -> bytes:
        body = struct.pack(">IIH", stream_id, 0, 0) + self._compress(headers)
        return self._control(SYN_STREAM, FLAG_FIN if fin else 0, body)

    def syn_reply(self, stream_id: int, headers=(), fin: bool = False) -> bytes:
        return self._control(SYN_REPLY, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + self._compress(headers))

    def headers(self, stream_id: int, headers, fin: bool = False) -> bytes:
        return self._control(HEADERS, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + self._compress(headers))

    @staticmethod
    def data(stream_id: int, data: bytes, fin: bool = False) -> bytes:
        """DATA frames for DATA (split at the 24-bit limit); an empty one with FIN closes our half."""
        out, at = [], 0
        while True:
            part = data[at:at + MAX_FRAME]
            at += len(part)
            last = at >= len(data)
            flags = FLAG_FIN if fin and last else 0
            out.append(struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(part)) + part)
            if last:
                return b"".join(out)

    def rst_stream(self, stream_id: int, status: int = CANCEL) -> bytes:
        return self._control(RST_STREAM, 0, struct.pack(">II", stream_id, status))

    def ping(self, ping_id: int) -> bytes:
        return self._control(PING, 0, struct.pack(">I", ping_id))

    def goaway(self, last_stream_id: int, status: int = 0) -> bytes:
        return self._control(GOAWAY, 0, struct.pack(">II", last_stream_id, status))

    def settings(self, entries: dict[int, int]) -> bytes:
        body = struct.pack(">I", len(entries)) + b"".join(struct.pack(">II", k, v) for k, v in entries.items())
        return self._control(SETTINGS, 0, body)

    def window_update(self, stream_id: int, delta: int) -> bytes:
        return self._control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))
