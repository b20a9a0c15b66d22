"""The per-service part of table `ip kube-proxy` as raw nf_tables netlink messages.

nft spends most of a large transaction parsing text and, before it evaluates
an `add rule` / `add element` / `delete chain`, listing every chain of the
ruleset (nft 1.0.6). The rules netemu writes have a handful of fixed shapes
(netemu.proxy.nftables), so this module encodes them itself, as the messages
nft would send, and sends them as one NFNL batch (NFNL_MSG_BATCH_BEGIN ...
NFNL_MSG_BATCH_END) on a NETLINK_NETFILTER socket: no listing, no parsing.
The kernel applies a batch as one transaction: all of it or nothing.

What is encoded is exactly what nft 1.0.6 sends for the same text (same
expressions, registers, flags and userdata TLVs, checked byte for byte by
tests/integration/test_nftnl.py), so that `nft list table ip kube-proxy` shows
the same table whichever path wrote it. Only the set ids nft adds to refer to
sets of the same batch are left out of rules and elements (the kernel finds a
set by name first); a new set gets one, as the kernel requires.
A rule text of any other shape raises Unsupported, and the caller falls back
to nft.

Speed: a full load of 10,000 services is ~110,000 messages, so nothing here
builds object trees. The constant parts of an expression are encoded once at
import (e.g. `payload load 4b @ network header + 16 => reg 1`), and a message
is those bytes joined with the few variable attributes (addresses, ports,
chain names) packed with struct. Numbers in nf_tables attributes are big
endian; register values are the bytes of the packet field, except the
results of `fib ... type` and the set's key byte order in userdata, which are
host-endian as nft writes them.

Sockets: like an nft context, a netlink socket belongs for life to the network
namespace of the thread that created it; create NftNetlink inside the node.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence

from netemu.proxy.nftables import (
    MAPS,
    MARK_MASQ_CHAIN,
    NO_ENDPOINT_NODEPORTS,
    REJECT_CHAIN,
    SERVICE_NODEPORTS,
    TABLE,
    NftDiff,
)

# -- numbers (linux/netfilter/nf_tables.h, nfnetlink.h, netlink.h) -------------
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG, NLMSGERR_ATTR_OFFS = 1, 2
NLA_F_NESTED = 0x8000
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_SUBSYS_NFTABLES = 10
AF_INET = socket.AF_INET            # NFPROTO_IPV4

_M = NFNL_SUBSYS_NFTABLES << 8
MSG_NEWTABLE, MSG_GETTABLE = _M | 0, _M | 1
MSG_NEWCHAIN, MSG_DELCHAIN = _M | 3, _M | 5
MSG_NEWRULE, MSG_DELRULE = _M | 6, _M | 8
MSG_NEWSET, MSG_DELSET = _M | 9, _M | 11
MSG_NEWSETELEM, MSG_DELSETELEM = _M | 12, _M | 14

NF_DROP, NF_ACCEPT = 0, 1
NFT_JUMP, NFT_GOTO, NFT_RETURN = -3, -4, -5
NFT_SET_TIMEOUT, NFT_SET_EVAL = 0x10, 0x20
TYPE_IPV4_ADDR = 7                  # nft's datatype id, stored as NFTA_SET_KEY_TYPE
BYTEORDER_BIG_ENDIAN = 2            # nft's enum byteorder, in the set's userdata
RTN_LOCAL = 2
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
COMMENT_MAX = 128                   # nft refuses longer comments (NFTNL_UDATA_COMMENT_MAXLEN)

# Message names for errors.
MSG_NAMES = {MSG_NEWCHAIN: "add chain", MSG_DELCHAIN: "delete chain", MSG_NEWRULE: "add rule",
             MSG_DELRULE: "flush chain", MSG_NEWSET: "add set", MSG_DELSET: "delete set",
             MSG_NEWSETELEM: "add element", MSG_DELSETELEM: "delete element"}


class Unsupported(ValueError):
    """A rule or element this encoder does not know; the caller uses nft instead."""


class NetlinkError(RuntimeError):
    """The kernel refused a batch; nothing of it was applied."""

    def __init__(self, message: str, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


# -- attributes ----------------------------------------------------------------
_pack = struct.pack
_join = b"".join
_HH = struct.Struct("<HH").pack


def _attr(atype: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return _HH(n, atype) + data + b"\0" * (-n & 3)


def _str(atype: int, text: str) -> bytes:
    return _attr(atype, text.encode() + b"\0")


def _u32(atype: int, value: int) -> bytes:
    return _attr(atype, _pack(">I", value & 0xFFFFFFFF))


def _nest(atype: int, *parts: bytes) -> bytes:
    return _attr(atype | NLA_F_NESTED, b"".join(parts))


def _expr(name: str, *attrs: bytes) -> bytes:
    """One element of NFTA_RULE_EXPRESSIONS: NFTA_EXPR_NAME + NFTA_EXPR_DATA."""
    return _nest(1, _str(1, name), _nest(2, *attrs))


def _value(atype: int, data: bytes) -> bytes:
    """NFTA_..._DATA { NFTA_DATA_VALUE }"""
    return _nest(atype, _attr(1, data))


def _verdict(atype: int, code: int, chain: str | None = None) -> bytes:
    """NFTA_..._DATA { NFTA_DATA_VERDICT { CODE, CHAIN } }"""
    inner = _u32(1, code) + (_str(2, chain) if chain is not None else b"")
    return _nest(atype, _nest(2, inner))


# -- expressions, as nft 1.0.6 encodes them --------------------------------------
REG_VERDICT, REG_1, REG_2 = 0, 1, 2


def _payload(base: int, offset: int, length: int) -> bytes:
    return _expr("payload", _u32(1, REG_1), _u32(2, base), _u32(3, offset), _u32(4, length))


def _cmp(op: int, data: bytes) -> bytes:
    return _expr("cmp", _u32(1, REG_1), _u32(2, op), _value(3, data))


_CMP_EQ, _CMP_NEQ = 0, 1
E_DADDR = _payload(1, 16, 4)                    # ip daddr
E_SADDR = _payload(1, 12, 4)                    # ip saddr
E_TH_DPORT = _payload(2, 2, 2)                  # th dport (tcp/udp/sctp dport)
_PAYLOAD_ADDR = {16: E_DADDR, 12: E_SADDR}
E_L4PROTO = _expr("meta", _u32(2, 16), _u32(1, REG_1))          # meta l4proto (key, dreg)
E_FIB_SADDR_TYPE = _expr("fib", _u32(3, 1), _u32(2, 3), _u32(1, REG_1))   # flags saddr, result type
E_CMP_LOCAL = _cmp(_CMP_EQ, _pack("=I", RTN_LOCAL))
E_CMP_ZERO = _cmp(_CMP_EQ, b"\0\0\0\0")
E_CMP_PROTO = {p: _cmp(_CMP_EQ, bytes([n])) for p, n in PROTOCOLS.items()}
_E_NAT = _expr("nat", _u32(1, 1), _u32(2, AF_INET), _u32(3, REG_1), _u32(5, REG_2),
               _u32(7, 0x2))                    # dnat, ip, addr_min reg 1, proto_min reg 2, PROTO_SPECIFIED

# cmp eq/neq on a 4-byte value: the bytes before the value, then the value.
_CMP4 = {op: _cmp(op, b"\0\0\0\0")[:-4] for op in (_CMP_EQ, _CMP_NEQ)}
_CMP2_EQ = _cmp(_CMP_EQ, b"\0\0")[:-4]          # 2-byte value + 2 bytes of padding
_IMM_REG1 = _expr("immediate", _u32(1, REG_1), _value(2, b"\0\0\0\0"))[:-4]
_IMM_REG2 = _expr("immediate", _u32(1, REG_2), _value(2, b"\0\0"))[:-4]        # 2 bytes + pad

_NUMGEN: dict[int, bytes] = {}


def e_numgen(mod: int) -> bytes:
    """numgen random mod MOD => reg 1"""
    b = _NUMGEN.get(mod)
    if b is None:
        b = _NUMGEN[mod] = _expr("numgen", _u32(1, REG_1), _u32(2, mod), _u32(3, 1), _u32(4, 0))
    return b


_IMM_NAME = _str(1, "immediate")
_IMM_DREG0 = _u32(1, REG_VERDICT)
_CODE = {v: _u32(1, v) for v in (NF_DROP, NF_ACCEPT, NFT_JUMP, NFT_GOTO, NFT_RETURN)}
_HHHH = struct.Struct("<HHHH").pack


_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")
_IMM_L2 = 4 + len(_IMM_DREG0) + 4        # NFTA_EXPR_DATA = this + verdict data length
_IMM_L1 = 4 + len(_IMM_NAME) + _IMM_L2   # the list element = this + verdict data length


def _e_verdict(code: int, chain: str | None = None) -> bytes:
    """immediate reg 0 <verdict> [-> chain], lengths packed in one go."""
    tail = _CODE[code]
    if chain is not None:
        name = chain.encode() + b"\0"
        n = 4 + len(name)
        tail = _join((tail, _HH(n, 2), name, _PAD[-n & 3]))
    l4 = 4 + len(tail)                   # NFTA_DATA_VERDICT (inside NFTA_IMMEDIATE_DATA)
    return _join((_HH(_IMM_L1 + l4, 1 | NLA_F_NESTED), _IMM_NAME, _HH(_IMM_L2 + l4, 2 | NLA_F_NESTED),
                  _IMM_DREG0, _HHHH(4 + l4, 2 | NLA_F_NESTED, l4, 2 | NLA_F_NESTED), tail))


# Verdicts to the helper chains recur in every service's rules.
_FIXED_VERDICTS = {(code, chain): _e_verdict(code, chain)
                   for code in (NFT_JUMP, NFT_GOTO) for chain in (MARK_MASQ_CHAIN, REJECT_CHAIN)}


def e_verdict(code: int, chain: str | None = None) -> bytes:
    """immediate reg 0 <verdict> [-> chain]"""
    return _FIXED_VERDICTS.get((code, chain)) or _e_verdict(code, chain)


def e_lookup(set_: str) -> bytes:
    """lookup reg 1 set SET (ip saddr @SET)"""
    return _expr("lookup", _u32(2, REG_1), _str(1, set_))


def e_dynset_update(set_: str) -> bytes:
    """dynset update reg_key 1 set SET (update @SET { ip saddr })"""
    return _expr("dynset", _u32(4, REG_1), _u32(3, 1), _str(1, set_))


def _ip(text: str) -> bytes:
    """A dotted-quad IPv4 address (inet_pton: no short or octal forms)."""
    try:
        return _inet_pton(AF_INET, text)
    except OSError:
        raise Unsupported(f"not an IPv4 address: {text!r}") from None


_inet_pton = socket.inet_pton


_PREFIX_CACHE: dict[tuple, bytes] = {}


def e_addr_match(offset: int, cidr: str, op: int) -> bytes:
    """ip saddr|daddr (OFFSET 12|16) [!=] ADDR or ADDR/LEN, as nft writes it:
    a byte-aligned prefix loads only its bytes; any other prefix loads 4 bytes
    and masks them."""
    if "/" not in cidr:
        return _PAYLOAD_ADDR[offset] + _CMP4[op] + _ip(cidr)
    key = (offset, cidr, op)
    b = _PREFIX_CACHE.get(key)
    if b is not None:
        return b
    addr, _, plen_s = cidr.partition("/")
    plen = int(plen_s) if plen_s.isdigit() else -1
    if not 0 < plen <= 32:
        raise Unsupported(f"prefix length {cidr!r}")
    raw = _ip(addr)
    mask = ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF).to_bytes(4, "big")
    net = bytes(a & m for a, m in zip(raw, mask))
    if net != raw:
        raise Unsupported(f"{cidr!r} has host bits set")
    if plen % 8 == 0:
        n = plen // 8
        b = _payload(1, offset, n) + _cmp(op, net[:n])
    else:
        b = (_payload(1, offset, 4) +
             _expr("bitwise", _u32(1, REG_1), _u32(2, REG_1), _u32(3, 4), _value(4, mask),
                   _value(5, b"\0\0\0\0")) +
             _cmp(op, net))
    if len(_PREFIX_CACHE) < 1024:
        _PREFIX_CACHE[key] = b
    return b


_PORTS: dict[str, bytes] = {}


def _port(text: str) -> bytes:
    """A port as a register value: 2 bytes, big endian, and 2 bytes of padding
    (what follows it in a cmp/immediate value attribute)."""
    b = _PORTS.get(text)
    if b is None:
        p = int(text)
        if not 0 <= p <= 0xFFFF:
            raise Unsupported(f"port {text!r}")
        b = _pack(">H", p) + b"\0\0"
        if len(_PORTS) < 65536:
            _PORTS[text] = b
    return b


_VERBS = {"jump": NFT_JUMP, "goto": NFT_GOTO}


def rule_expressions(rule: str) -> tuple[bytes, bytes]:
    """(NFTA_RULE_EXPRESSIONS contents, NFTA_RULE_USERDATA value or b"") of a
    rule text of one of the shapes netemu.proxy.nftables writes.

    The hot path of a full load (70,000 rules at 10,000 services): one
    split, and one b"".join of precomputed pieces per rule."""
    comment = None
    i = rule.find(' comment "')
    if i >= 0:
        comment = rule[i + 10:-1]
        rule = rule[:i]
    t = rule.split()
    n = len(t)
    first = t[0] if t else ""
    if n == 2 and first in _VERBS:                               # goto|jump CHAIN
        ex = e_verdict(_VERBS[first], t[1])
    elif first == "meta" and n == 6 and t[1] == "l4proto" and t[2] in PROTOCOLS and t[3] == "dnat" \
            and t[4] == "to":                                    # meta l4proto P dnat to IP:PORT
        ip, _, port = t[5].rpartition(":")
        ex = _join((E_L4PROTO, E_CMP_PROTO[t[2]], _IMM_REG1, _ip(ip), _IMM_REG2, _port(port), _E_NAT))
    elif first == "ip" and n == 5 and t[1] == "saddr" and t[3] in _VERBS:
        if t[2][0] == "@":                                       # ip saddr @SET goto C
            ex = _join((E_SADDR, e_lookup(t[2][1:]), e_verdict(_VERBS[t[3]], t[4])))
        else:                                                    # ip saddr ADDR[/LEN] jump|goto C
            ex = e_addr_match(12, t[2], _CMP_EQ) + e_verdict(_VERBS[t[3]], t[4])
    elif first == "numgen" and n == 7 and t[1] == "random" and t[2] == "mod" and t[4] == "0" \
            and t[5] == "goto":                                  # numgen random mod N 0 goto C
        ex = _join((e_numgen(int(t[3])), E_CMP_ZERO, e_verdict(NFT_GOTO, t[6])))
    elif first == "ip" and n == 12 and t[1] == "daddr" and t[4] == "dport" and t[6] == "ip" \
            and t[7] == "saddr" and t[8] == "!=" and t[3] in PROTOCOLS and t[10] in _VERBS:
        # ip daddr VIP PROTO dport PORT ip saddr != CIDR jump C
        ex = _join((E_DADDR, _CMP4[_CMP_EQ], _ip(t[2]), E_L4PROTO, E_CMP_PROTO[t[3]],
                    E_TH_DPORT, _CMP2_EQ, _port(t[5]),
                    e_addr_match(12, t[9], _CMP_NEQ), e_verdict(_VERBS[t[10]], t[11])))
    elif first == "fib" and n == 6 and t[1:4] == ["saddr", "type", "local"] and t[4] in _VERBS:
        ex = _join((E_FIB_SADDR_TYPE, E_CMP_LOCAL, e_verdict(_VERBS[t[4]], t[5])))
    elif first == "update" and n == 6 and t[1][0] == "@" and t[2:] == ["{", "ip", "saddr", "}"]:
        ex = E_SADDR + e_dynset_update(t[1][1:])
    else:
        raise Unsupported(f"rule shape not encoded: {rule!r}")
    return ex, (_comment_udata(comment) if comment is not None else b"")


def _comment_udata(text: str) -> bytes:
    """The comment TLV nft stores in a rule's or element's userdata (type 0)."""
    raw = text.encode()
    if len(raw) > COMMENT_MAX:
        raise Unsupported(f"comment longer than nft accepts: {text!r}")
    return bytes((0, len(raw) + 1)) + raw + b"\0"


# -- messages ------------------------------------------------------------------
_HDR = struct.Struct("<IHHIIBBH").pack
_TABLE_ATTR = _str(1, TABLE)
_SET_UDATA = _attr(13, bytes((0, 4)) + _pack("=I", BYTEORDER_BIG_ENDIAN))   # key byteorder: big endian
_RULE_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND    # append, as `add rule`
_ELEMS_MAX = 60000            # an attribute's length is 16 bits: split element lists below it


class Batch:
    """Messages of one NFNL batch (one kernel transaction), in order.

    Each message is kept as its bytes with its sequence number (1, 2, ...)
    and a label that names it in an error.
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.labels: list[tuple] = []
        self._set_ids = 0

    def __len__(self) -> int:
        return len(self.parts)

    def _msg(self, mtype: int, flags: int, attrs: bytes, label: tuple) -> None:
        self.labels.append(label)
        self.parts.append(_HDR(20 + len(attrs), mtype, flags, len(self.labels), 0, AF_INET, 0, 0) + attrs)

    # chains
    def add_chain(self, chain: str) -> None:
        self._msg(MSG_NEWCHAIN, NLM_F_REQUEST | NLM_F_CREATE, _TABLE_ATTR + _str(3, chain), (MSG_NEWCHAIN, chain))

    def delete_chain(self, chain: str) -> None:
        self._msg(MSG_DELCHAIN, NLM_F_REQUEST, _TABLE_ATTR + _str(3, chain), (MSG_DELCHAIN, chain))

    def flush_chain(self, chain: str) -> None:
        self._msg(MSG_DELRULE, NLM_F_REQUEST, _TABLE_ATTR + _str(2, chain), (MSG_DELRULE, chain))

    def add_rules(self, chain: str, rules: Iterable[str]) -> None:
        """Append RULES to CHAIN (the hot loop of a full load: _msg inlined)."""
        head = _TABLE_ATTR + _str(2, chain)
        size = 20 + len(head) + 4
        parts, labels = self.parts, self.labels
        for rule in rules:
            ex, udata = rule_expressions(rule)
            tail = _attr(7, udata) if udata else b""
            labels.append((MSG_NEWRULE, chain, rule))
            parts.append(_join((_HDR(size + len(ex) + len(tail), MSG_NEWRULE, _RULE_FLAGS, len(labels), 0,
                                     AF_INET, 0, 0), head, _HH(4 + len(ex), 4 | NLA_F_NESTED), ex, tail)))

    # affinity sets
    def add_set(self, name: str, timeout: int) -> None:
        """type ipv4_addr; flags dynamic,timeout; timeout TIMEOUTs

        The kernel wants an id (NFTA_SET_ID, unique in the batch) for every
        new set; rules still refer to the set by name."""
        self._set_ids += 1
        attrs = (_TABLE_ATTR + _str(2, name) + _u32(3, NFT_SET_TIMEOUT | NFT_SET_EVAL) +
                 _u32(4, TYPE_IPV4_ADDR) + _u32(5, 4) + _u32(10, self._set_ids) +
                 _attr(11, _pack(">Q", timeout * 1000)) + _SET_UDATA)
        self._msg(MSG_NEWSET, NLM_F_REQUEST | NLM_F_CREATE, attrs, (MSG_NEWSET, name))

    def delete_set(self, name: str) -> None:
        self._msg(MSG_DELSET, NLM_F_REQUEST, _TABLE_ATTR + _str(2, name), (MSG_DELSET, name))

    # verdict map elements
    def add_elements(self, mapname: str, items: Sequence[tuple[str, tuple[str, str]]]) -> None:
        self._elements(MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE, mapname,
                       [_elem_add(mapname, k, v) for k, v in items])

    def delete_elements(self, mapname: str, keys: Sequence[str]) -> None:
        self._elements(MSG_DELSETELEM, NLM_F_REQUEST, mapname,
                       [_nest(1, _attr(1, _map_key(mapname, k))) for k in keys])

    def _elements(self, mtype: int, flags: int, mapname: str, elems: list[bytes]) -> None:
        """ELEMS (each an element's attributes) in as many messages as needed.

        libnftnl numbers the elements of a list 1, 2, ... (the kernel does
        not look at the number); so do we, to send the same bytes."""
        head = _TABLE_ATTR + _str(2, mapname)
        i = 0
        while i < len(elems):
            parts, size, j = [], 0, i
            while j < len(elems) and size + len(elems[j]) + 4 < _ELEMS_MAX:
                parts.append(_HH(4 + len(elems[j]), (j - i + 1) | NLA_F_NESTED))
                parts.append(elems[j])
                size += 4 + len(elems[j])
                j += 1
            self._msg(mtype, flags, head + _HH(4 + size, 3 | NLA_F_NESTED) + b"".join(parts),
                      (mtype, mapname, j - i))
            i = j

    def encode(self) -> bytes:
        """BATCH_BEGIN, the messages, BATCH_END (asking for an ACK of the end:
        kernels since 6.10 send it once the transaction is committed)."""
        begin = _HDR(20, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0, 0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
        end = _HDR(20, NFNL_MSG_BATCH_END, NLM_F_REQUEST | NLM_F_ACK,
                   len(self.parts) + 1, 0, 0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
        return b"".join((begin, *self.parts, end))

    def describe(self, seq: int) -> str:
        """The message with sequence number SEQ, for an error."""
        if seq == 0:
            return "batch begin"
        if not 0 < seq <= len(self.labels):
            return "batch end (commit)" if seq == len(self.labels) + 1 else f"message #{seq}"
        label = self.labels[seq - 1]
        what = MSG_NAMES.get(label[0], hex(label[0]))
        if label[0] == MSG_NEWRULE:
            return f"#{seq} {what} {label[1]} {label[2]}"
        if label[0] in (MSG_NEWSETELEM, MSG_DELSETELEM):
            return f"#{seq} {what} {label[1]} ({label[2]} elements)"
        return f"#{seq} {what} {label[1]}"


def _map_key(mapname: str, key: str) -> bytes:
    """"10.96.0.10 . tcp . 80" -> 12 bytes; "tcp . 30080" -> 8 bytes (4-byte registers)."""
    parts = key.split(" . ")
    if mapname in (SERVICE_NODEPORTS, NO_ENDPOINT_NODEPORTS):
        if len(parts) != 2 or parts[0] not in PROTOCOLS:
            raise Unsupported(f"{mapname} key {key!r}")
        return bytes((PROTOCOLS[parts[0]], 0, 0, 0)) + _port(parts[1])
    if len(parts) != 3 or parts[1] not in PROTOCOLS:
        raise Unsupported(f"{mapname} key {key!r}")
    return _ip(parts[0]) + bytes((PROTOCOLS[parts[1]], 0, 0, 0)) + _port(parts[2])


_ELEM_VERDICTS = {"drop": NF_DROP, "accept": NF_ACCEPT, "return": NFT_RETURN}


def _elem_add(mapname: str, key: str, value: tuple[str, str]) -> bytes:
    verdict, comment = value
    v = verdict.split()
    if len(v) == 2 and v[0] in _VERBS:
        data = _verdict(2, _VERBS[v[0]], v[1])
    elif len(v) == 1 and v[0] in _ELEM_VERDICTS:
        data = _verdict(2, _ELEM_VERDICTS[v[0]])
    else:
        raise Unsupported(f"verdict {verdict!r}")
    # The text path writes the comment quoted, with " turned into ' (nftables._q).
    return (_nest(1, _attr(1, _map_key(mapname, key))) + data +
            _attr(6, _comment_udata(comment.replace('"', "'"))))


def diff_batch(d: NftDiff) -> Batch:
    """The batch applying D, in NftDiff's order."""
    b = Batch()
    for m in MAPS:
        if d.del_elements[m]:
            b.delete_elements(m, d.del_elements[m])
    for c in d.flush_chains:
        b.flush_chain(c)
    for s in d.del_sets:
        b.delete_set(s)
    for s, t in d.add_sets:
        b.add_set(s, t)
    for c in d.add_chains:
        b.add_chain(c)
    for c, rules in d.rules:
        b.add_rules(c, rules)
    for m in MAPS:
        if d.add_elements[m]:
            b.add_elements(m, d.add_elements[m])
    for c in d.del_chains:
        b.delete_chain(c)
    return b


# -- the socket ------------------------------------------------------------------

class NftNetlink:
    """A NETLINK_NETFILTER socket in the creating thread's namespace; sends batches."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            # Errors carry only the failing message's header (its seq), plus
            # the kernel's extended ack text when it has one.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        except OSError:
            self.sock.close()
            raise
        self._sndbuf = 0
        self._seq = 0
        self.last_acked = False
        # Seconds the last batch's sendmsg() took: the kernel applies the whole
        # transaction (and commits it) inside that call, so this is the
        # kernel's own time for it (tools/bench_proxy.py sets it beside ours).
        self.last_send_seconds = 0.0

    def table_exists(self, family: int = AF_INET, table: str = TABLE) -> bool:
        """Whether the table exists (NFT_MSG_GETTABLE, outside any batch)."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        seq_sent = 0x80000000 | self._seq          # never a batch's (those count from 0)
        msg = _HDR(20 + len(_str(1, table)), MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK, seq_sent, 0, family, 0, 0)
        self.sock.send(msg + _str(1, table))
        found = False
        while True:
            data = self.sock.recv(65536)
            for mtype, _flags, seq, payload in _messages(data):
                if seq != seq_sent:
                    continue
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("<i", payload)[0]
                    if err == 0:
                        return found
                    if err == errno.ENOENT:
                        return False
                    raise NetlinkError(f"get table: {os.strerror(err)}", err)
                if mtype == MSG_NEWTABLE:
                    found = True

    def send(self, batch: Batch) -> int:
        """Send BATCH as one transaction; raise NetlinkError if the kernel refused it.

        The kernel handles a batch inside sendmsg() and queues its answers
        (an error per refused message, or for the commit; the ACK of
        BATCH_END on kernels >= 6.10) before the call returns, so they are
        read without waiting. No error means applied; `last_acked` says
        whether the kernel also confirmed it.
        """
        if not len(batch):
            return 0
        data = batch.encode()
        need = len(data) + 65536
        if need > self._sndbuf:
            # The whole batch must fit in one skb (one transaction).
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, need)
            self._sndbuf = need
        self.last_acked = False
        t0 = time.perf_counter()
        self.sock.send(data)
        self.last_send_seconds = time.perf_counter() - t0
        errors: list[tuple[int, int, str]] = []
        while True:
            try:
                chunk = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:        # ENOBUFS: so many errors that some were lost
                errors.append((e.errno or 0, -1, str(e)))
                break
            for mtype, flags, seq, payload in _messages(chunk):
                if mtype != NLMSG_ERROR:
                    continue
                err = -struct.unpack_from("<i", payload)[0]
                if err == 0:
                    self.last_acked = self.last_acked or seq == len(batch) + 1
                    continue
                errors.append((err, struct.unpack_from("<I", payload, 12)[0], _ext_ack_msg(flags, payload)))
        if errors:
            err, seq, text = errors[0]
            where = batch.describe(seq) if seq >= 0 else "?"
            more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
            raise NetlinkError(f"nf_tables batch refused at {where}: {os.strerror(err)}"
                               + (f" ({text})" if text else "") + more, err)
        return len(data)

    def close(self) -> None:
        self.sock.close()


def _messages(data: bytes):
    off = 0
    while off + 16 <= len(data):
        length, mtype, flags, seq, _pid = struct.unpack_from("<IHHII", data, off)
        if length < 16:
            break
        yield mtype, flags, seq, data[off + 16:off + length]
        off += (length + 3) & ~3


def _ext_ack_msg(flags: int, payload: bytes) -> str:
    """The extended ack message of an NLMSG_ERROR (NETLINK_CAP_ACK: 4 + 16 bytes first)."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    off = 20
    while off + 4 <= len(payload):
        ln, at = struct.unpack_from("<HH", payload, off)
        if ln < 4:
            break
        if at == NLMSGERR_ATTR_MSG:
            return payload[off + 4:off + ln].rstrip(b"\0").decode(errors="replace")
        off += (ln + 3) & ~3
    return ""
