"""Deleting stale UDP conntrack entries over ctnetlink, in one dump and a few sends.

kube-proxy removes the conntrack entries of a UDP flow whose endpoint is gone
(see model.stale_udp_flows). Running `conntrack -D` once per removed endpoint
costs a process and a full table walk each: 29 services x 200 endpoints was
5,800 processes in series, and a sync of two minutes. Here, as kube-proxy
does since it moved to netlink (conntrack.CleanStaleEntries), the table is
listed once (IPCTNL_MSG_CT_GET with NLM_F_DUMP), the entries are filtered in
Python (model.select_stale), and the selected ones are deleted by tuple and
id (IPCTNL_MSG_CT_DELETE), many delete messages packed into each sendmsg()
(the kernel handles every message of a send in order, acking each).

Messages are encoded and parsed here with struct, as nftnl does for
nf_tables; the layouts are linux/netfilter/nfnetlink_conntrack.h.

Sockets: a netlink socket belongs for life to the network namespace of the
thread that created it; create ConntrackNetlink inside the node.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator

from netemu.proxy.model import ConntrackEntry, StaleFlow, select_stale

NETLINK_NETFILTER = 12
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_RCVBUFFORCE = 33
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLA_F_NESTED, NLA_TYPE_MASK = 0x8000, 0x3FFF
NFNL_SUBSYS_CTNETLINK = 1
MSG_CT_NEW = NFNL_SUBSYS_CTNETLINK << 8 | 0
MSG_CT_GET = NFNL_SUBSYS_CTNETLINK << 8 | 1
MSG_CT_DELETE = NFNL_SUBSYS_CTNETLINK << 8 | 2

# enum ctattr_type, ctattr_tuple, ctattr_ip, ctattr_l4proto
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ID, CTA_ZONE = 1, 2, 12, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

# How many bytes of delete messages go in one sendmsg(): the kernel queues an
# ack per message (36 bytes with NETLINK_CAP_ACK) before the call returns, and
# these must fit the receive buffer set below.
SEND_CHUNK = 64 << 10
RCVBUF = 4 << 20

_HDR = struct.Struct("<IHHII").pack          # nlmsghdr
_NFGEN = struct.Struct("<BBH").pack          # nfgenmsg: family, version, res_id (big endian, 0)
_AH = struct.Struct("<HH")


class ConntrackError(RuntimeError):
    pass


# -- encoding (pure) -------------------------------------------------------------

def _attr(atype: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return _AH.pack(n, atype) + data + b"\0" * (-n & 3)


def _nest(atype: int, *parts: bytes) -> bytes:
    return _attr(atype | NLA_F_NESTED, b"".join(parts))


def dump_request(seq: int, family: int = socket.AF_INET) -> bytes:
    """IPCTNL_MSG_CT_GET | NLM_F_DUMP: every entry of FAMILY."""
    return _HDR(20, MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + _NFGEN(family, 0, 0)


def delete_request(entry: ConntrackEntry, seq: int) -> bytes:
    """IPCTNL_MSG_CT_DELETE of ENTRY, found by its original tuple and zone; its
    id makes the kernel refuse (ENOENT) a newer entry that reuses the tuple."""
    tuple_ = _nest(CTA_TUPLE_ORIG,
                   _nest(CTA_TUPLE_IP,
                         _attr(CTA_IP_V4_SRC, socket.inet_aton(entry.src)),
                         _attr(CTA_IP_V4_DST, socket.inet_aton(entry.dst))),
                   _nest(CTA_TUPLE_PROTO,
                         _attr(CTA_PROTO_NUM, bytes([entry.proto])),
                         _attr(CTA_PROTO_SRC_PORT, struct.pack(">H", entry.sport)),
                         _attr(CTA_PROTO_DST_PORT, struct.pack(">H", entry.dport))))
    attrs = tuple_ + _attr(CTA_ID, struct.pack(">I", entry.id))
    if entry.zone:
        attrs += _attr(CTA_ZONE, struct.pack(">H", entry.zone))
    return _HDR(20 + len(attrs), MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, 0) \
        + _NFGEN(socket.AF_INET, 0, 0) + attrs


# -- parsing (pure) ----------------------------------------------------------------

def _attrs(data: bytes, off: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(type, start of value, end of value) of each attribute in DATA[OFF:END],
    stopping at a length that does not fit (never reading past END)."""
    end = len(data) if end is None else end
    while off + 4 <= end:
        ln, at = _AH.unpack_from(data, off)
        if ln < 4 or off + ln > end:
            return
        yield at & NLA_TYPE_MASK, off + 4, off + ln
        off += (ln + 3) & ~3


def _tuple(data: bytes, start: int, end: int) -> tuple[str, str, int, int, int] | None:
    src = dst = None
    proto = sport = dport = 0
    for at, s, e in _attrs(data, start, end):
        if at == CTA_TUPLE_IP:
            for a, s2, e2 in _attrs(data, s, e):
                if e2 - s2 == 4 and a in (CTA_IP_V4_SRC, CTA_IP_V4_DST):
                    ip = socket.inet_ntoa(data[s2:e2])
                    if a == CTA_IP_V4_SRC:
                        src = ip
                    else:
                        dst = ip
        elif at == CTA_TUPLE_PROTO:
            for a, s2, e2 in _attrs(data, s, e):
                if a == CTA_PROTO_NUM and e2 - s2 >= 1:
                    proto = data[s2]
                elif a in (CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT) and e2 - s2 >= 2:
                    port = struct.unpack_from(">H", data, s2)[0]
                    if a == CTA_PROTO_SRC_PORT:
                        sport = port
                    else:
                        dport = port
    if src is None or dst is None:
        return None
    return src, dst, proto, sport, dport


def parse_entry(payload: bytes) -> ConntrackEntry | None:
    """A ConntrackEntry from the payload of an IPCTNL_MSG_CT_NEW message (after
    the nlmsghdr, nfgenmsg first), or None if it is not an IPv4 entry with
    both tuples."""
    orig = reply = None
    ct_id = zone = 0
    for at, s, e in _attrs(payload, 4):
        if at == CTA_TUPLE_ORIG:
            orig = _tuple(payload, s, e)
        elif at == CTA_TUPLE_REPLY:
            reply = _tuple(payload, s, e)
        elif at == CTA_ID and e - s == 4:
            ct_id = struct.unpack_from(">I", payload, s)[0]
        elif at == CTA_ZONE and e - s >= 2:
            zone = struct.unpack_from(">H", payload, s)[0]
    if orig is None or reply is None:
        return None
    src, dst, proto, sport, dport = orig
    return ConntrackEntry(proto, src, dst, sport, dport, reply[0], ct_id, zone)


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    off = 0
    while off + 16 <= len(data):
        length, mtype, flags, seq, _pid = struct.unpack_from("<IHHII", data, off)
        if length < 16 or off + length > len(data):
            return
        yield mtype, flags, seq, data[off + 16:off + length]
        off += (length + 3) & ~3


# -- the socket ----------------------------------------------------------------------

class ConntrackNetlink:
    """A ctnetlink socket in the creating thread's namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            # An error ack carries the failing message's header only, not all of it.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            self.sock.close()
            raise
        self._seq = 0
        self.dumps = 0              # dump requests sent, for tests and stats
        self.sends = 0              # sendmsg() calls carrying deletes

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def dump(self) -> list[ConntrackEntry]:
        """Every IPv4 entry of the namespace's table, one dump request."""
        seq = self._next_seq()
        self.sock.send(dump_request(seq))
        self.dumps += 1
        entries = []
        while True:
            data = self.sock.recv(1 << 20)
            for mtype, _flags, mseq, payload in _messages(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return entries
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("<i", payload)[0]
                    if err:
                        raise ConntrackError(f"conntrack dump: {os.strerror(err)}")
                    return entries
                if mtype == MSG_CT_NEW:
                    entry = parse_entry(payload)
                    if entry is not None:
                        entries.append(entry)

    def delete(self, entries: Iterable[ConntrackEntry]) -> int:
        """Delete ENTRIES, many per sendmsg(); the number the kernel deleted.

        An entry already gone (expired, or replaced: its id differs) is not
        an error: ENOENT is what deleting it would leave anyway.
        """
        deleted = 0
        chunk: list[bytes] = []
        size = 0
        first = self._seq + 1
        for entry in entries:
            msg = delete_request(entry, self._next_seq())
            chunk.append(msg)
            size += len(msg)
            if size >= SEND_CHUNK:
                deleted += self._send_deletes(chunk, first)
                chunk, size, first = [], 0, self._seq + 1
        if chunk:
            deleted += self._send_deletes(chunk, first)
        return deleted

    def _send_deletes(self, chunk: list[bytes], first_seq: int) -> int:
        self.sock.send(b"".join(chunk))
        self.sends += 1
        # The kernel has handled every message and queued every ack before
        # send() returned; read them without waiting.
        acked = deleted = 0
        errors: list[int] = []
        while acked < len(chunk):
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for mtype, _flags, seq, payload in _messages(data):
                if mtype != NLMSG_ERROR or (seq - first_seq) & 0xFFFFFFFF >= len(chunk):
                    continue
                acked += 1
                err = -struct.unpack_from("<i", payload)[0]
                if err == 0:
                    deleted += 1
                elif err != errno.ENOENT:
                    errors.append(err)
        if errors:
            raise ConntrackError(f"conntrack delete: {os.strerror(errors[0])}"
                                 + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        return deleted

    def clean(self, flows: Iterable[StaleFlow]) -> tuple[int, int]:
        """Delete the entries FLOWS select: (entries selected, entries deleted).
        One dump whatever the number of flows; nothing at all when there are none."""
        flows = list(flows)
        if not flows:
            return 0, 0
        stale = select_stale(self.dump(), flows)
        return len(stale), self.delete(stale) if stale else 0

    def close(self) -> None:
        self.sock.close()
