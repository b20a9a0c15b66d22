"""Link impairment as data: what a link is set to, parsed, checked and turned
into the tc and nft commands that do it (pure: nothing here touches the machine).

What each property runs on (the kernel netemu is developed on has no netem, fq,
fq_codel, cake or etf; it has tbf, htb, pfifo, ifb, mirred and nftables with the
netdev egress hook):

- rate: a tbf qdisc at the root of the sending end; with a queue limit, an htb
  class with a pfifo of LIMIT packets under it (tbf's limit is in bytes).
- loss: an nftables rule `numgen random mod 1000000 < N drop` on the netdev
  egress hook of the sending end: exact to one packet in a million.
- duplicate: an nftables `dup to` the same device on that hook; the copy is
  marked so that it is neither dropped nor duplicated again on its way out.
- delay and jitter: netemu's own delay line (netemu.delayline): the egress
  hook forwards every frame to a tap device, a process in the end's namespace
  holds it for its time and sends it out of the end again, marked so that the
  hook lets it pass. A userspace hop: its throughput ceiling is far below the
  kernel's (tools/bench_link.py measures it).
- reorder: the delay line sends that share of frames at once, ahead of the
  delayed ones (netem's `reorder`, without its correlation); needs a delay.
- corrupt: refused (netem's bit errors: nothing else in this kernel flips bits).

Loss and duplication count packets as the sending end sees them: a burst sent
with segmentation offload (a 64 KB TCP segment, a UDP GSO batch) is one packet
there, as it is for netem's loss. Rate is exact either way (tbf charges each
burst for the frames it becomes).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from netemu.names import short_hash

PPM = 1_000_000
# Marks a copy made by `duplicate`, so that it skips the link's own rules when it
# passes the egress hook again. The mark is gone once the frame crosses into the
# peer's namespace (a veth scrubs it), so nothing else ever sees it.
DUP_MARK = 0x6e65
# Marks a frame the delay line sends out after its time (netemu.delayline).
DELAY_MARK = 0x6e64
TABLE = "netemu-link"

# Properties a link has in Mininet's TCLink / netem that this kernel cannot do.
UNSUPPORTED = {
    "corrupt": "this kernel has no netem qdisc, and nothing else in it flips bits of a packet",
}
KEYS = ("rate", "loss", "duplicate", "limit", "delay", "jitter", "reorder", *UNSUPPORTED)
DELAY_MAX_US = 10_000_000       # 10 s

_RATE_UNITS = {  # tc's units (tc(8)): bits per second per unit
    "bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000, "tbit": 10 ** 12,
    "bps": 8, "kbps": 8_000, "mbps": 8_000_000, "gbps": 8_000_000_000,
}
DEFAULT_LIMIT = 1000        # frames queued behind a rate when no limit is set
RATE_MIN, RATE_MAX = 8_000, 100 * 10 ** 9      # 1 kB/s .. 100 Gbit/s


class ImpairmentError(ValueError):
    """A bad property: str(e) is one line, "<property>: <problem>"."""

    def __init__(self, message: str):
        super().__init__(message)
        self.where, _, self.problem = message.partition(": ")


@dataclasses.dataclass(frozen=True)
class Impairment:
    rate: int | None = None     # bit/s
    loss: int = 0               # packets per million
    duplicate: int = 0          # packets per million
    limit: int | None = None    # queue limit in packets (with rate)
    delay: int = 0              # microseconds, each direction
    jitter: int = 0             # microseconds, +- around delay
    reorder: int = 0            # per million: sent at once, ahead of the delayed ones

    def __bool__(self) -> bool:
        return bool(self.rate or self.loss or self.duplicate or self.delay)

    def settings(self) -> dict[str, str]:
        """Each property set, written as `link set` takes it."""
        out = {}
        if self.rate:
            out["rate"] = format_rate(self.rate)
        if self.loss:
            out["loss"] = format_ppm(self.loss)
        if self.duplicate:
            out["duplicate"] = format_ppm(self.duplicate)
        if self.limit:
            out["limit"] = str(self.limit)
        if self.delay:
            out["delay"] = format_duration(self.delay)
        if self.jitter:
            out["jitter"] = format_duration(self.jitter)
        if self.reorder:
            out["reorder"] = format_ppm(self.reorder)
        return out

    def mechanisms(self) -> dict[str, str]:
        """Which kernel object does each property set."""
        out = {}
        if self.rate:
            out["rate"] = "tc htb + pfifo (root, egress)" if self.limit else "tc tbf (root, egress)"
        if self.loss:
            out["loss"] = f"nftables numgen random (table netdev {TABLE}-DEVICE, egress)"
        if self.duplicate:
            out["duplicate"] = f"nftables dup (table netdev {TABLE}-DEVICE, egress)"
        if self.limit:
            out["limit"] = "tc pfifo under the htb class"
        if self.delay:
            out["delay"] = "netemu delay line (nft fwd to a tap, python -m netemu.delayline)"
        if self.jitter:
            out["jitter"] = "netemu delay line (uniform; delayed frames keep their order)"
        if self.reorder:
            out["reorder"] = "netemu delay line (that share sent at once, ahead of the delayed)"
        return out


def format_rate(bits: int) -> str:
    for unit in ("gbit", "mbit", "kbit"):
        if bits % _RATE_UNITS[unit] == 0:
            return f"{bits // _RATE_UNITS[unit]}{unit}"
    return f"{bits}bit"


def format_ppm(ppm: int) -> str:
    return f"{ppm / 10_000:g}%"


def format_duration(us: int) -> str:
    if us % 1000:
        return f"{us}us"
    return f"{us // 1000}ms" if us % 1_000_000 else f"{us // 1_000_000}s"


_TIME_UNITS = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 1_000_000, "sec": 1_000_000}


def parse_duration(value: Any, where: str) -> int:
    """'20ms', '500us', '1.5s' (tc's units) -> microseconds."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)\s*", str(value))
    if isinstance(value, bool) or not m or m.group(2) not in _TIME_UNITS:
        raise ImpairmentError(f"{where}: invalid duration {str(value)!r}: use a number and one of "
                              "us, ms, s (e.g. 20ms)")
    us = round(float(m.group(1)) * _TIME_UNITS[m.group(2)])
    if us > DELAY_MAX_US:
        raise ImpairmentError(f"{where}: {value} is more than 10s")
    return us


def parse_rate(value: Any, where: str = "rate") -> int:
    """'100mbit', '1.5gbit', '500kbps' (tc's units) -> bit/s."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*", str(value))
    if isinstance(value, bool) or not m or m.group(2).lower() not in _RATE_UNITS:
        raise ImpairmentError(f"{where}: invalid rate {str(value)!r}: use a number and one of "
                              f"{', '.join(_RATE_UNITS)} (e.g. 100mbit)")
    bits = round(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    if not RATE_MIN <= bits <= RATE_MAX:
        raise ImpairmentError(f"{where}: {value} is outside 8kbit..100gbit")
    return bits


def parse_percent(value: Any, where: str) -> int:
    """'1%', '0.1%', '1' (percent, as netem reads it) -> packets per million."""
    text = str(value).strip()
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)%?", text)
    if isinstance(value, bool) or not m:
        raise ImpairmentError(f"{where}: invalid percentage {text!r}: use e.g. 1% or 0.1%")
    ppm = float(m.group(1)) * 10_000
    if ppm > PPM:
        raise ImpairmentError(f"{where}: {text} is more than 100%")
    if abs(ppm - round(ppm)) > 1e-6:
        raise ImpairmentError(f"{where}: {text} is finer than 0.0001% (one packet in a million)")
    return round(ppm)


def parse(props: dict[str, Any], where: str = "") -> Impairment:
    """A mapping of property -> value (a topology file's `link:`, or `link set`'s
    flags) -> Impairment. WHERE prefixes each error ("nodes[0].link")."""
    def at(key):
        return f"{where}.{key}" if where else key

    for key, value in props.items():
        if key not in KEYS:
            raise ImpairmentError(f"{at(key)}: unknown link property (allowed: {', '.join(KEYS)})")
        if key in UNSUPPORTED and value is not None:
            raise ImpairmentError(f"{at(key)}: not supported: {UNSUPPORTED[key]}")
    rate = parse_rate(props["rate"], at("rate")) if props.get("rate") is not None else None
    loss = parse_percent(props["loss"], at("loss")) if props.get("loss") is not None else 0
    dup = parse_percent(props["duplicate"], at("duplicate")) if props.get("duplicate") is not None else 0
    limit = None
    if props.get("limit") is not None:
        raw = props["limit"]
        if isinstance(raw, bool) or not re.fullmatch(r"[0-9]+", str(raw).strip()) \
                or not 1 <= int(str(raw)) <= 1_000_000:
            raise ImpairmentError(f"{at('limit')}: must be a number of packets from 1 to 1000000, got {raw!r}")
        limit = int(str(raw))
        if rate is None:
            raise ImpairmentError(f"{at('limit')}: a queue limit needs a rate (without one no queue forms)")
    delay = parse_duration(props["delay"], at("delay")) if props.get("delay") is not None else 0
    jitter = parse_duration(props["jitter"], at("jitter")) if props.get("jitter") is not None else 0
    if jitter and not delay:
        raise ImpairmentError(f"{at('jitter')}: jitter needs a delay to spread")
    reorder = parse_percent(props["reorder"], at("reorder")) if props.get("reorder") is not None else 0
    if reorder and not delay:
        raise ImpairmentError(f"{at('reorder')}: reordering needs a delay (the frames reordered are "
                              "sent without it, ahead of the delayed ones)")
    return Impairment(rate=rate, loss=loss, duplicate=dup, limit=limit, delay=delay, jitter=jitter,
                      reorder=reorder)


# A pod's link, as the kubelet reads it (netemu.node.sandbox): the annotation
# `netemu.io/link: "rate 10mbit delay 5ms"` on the pod.
POD_ANNOTATION = "netemu.io/link"


def parse_words(text: str, where: str) -> Impairment:
    """"rate 10mbit delay 5ms" (PROPERTY VALUE pairs, as `bench --link` takes
    them) -> Impairment; errors start with WHERE."""
    words = str(text).split()
    if len(words) % 2:
        raise ImpairmentError(f"{where}: expected PROPERTY VALUE pairs (e.g. \"rate 10mbit delay 5ms\"), "
                              f"got {text!r}")
    props = dict(zip(words[::2], words[1::2]))
    if len(props) * 2 != len(words):
        raise ImpairmentError(f"{where}: a property is given twice in {text!r}")
    return parse(props, where)


def burst_bytes(rate: int, mtu: int) -> int:
    """tbf/htb bucket: what the link sends at once. At least 4 ms of the rate
    (the timer a token bucket waits on is not finer than that everywhere, and a
    smaller bucket runs below its rate) and at least ten full frames."""
    return max(rate // 8 // 250, 10 * (mtu + 14))


def tc_commands(dev: str, imp: Impairment, mtu: int) -> list[list[str]]:
    """tc argv lists that put IMP's rate on DEV's egress (none without a rate)."""
    if not imp.rate:
        return []
    burst = burst_bytes(imp.rate, mtu)
    if imp.limit is None:
        # A queue of DEFAULT_LIMIT full frames (in bytes: tbf counts bytes), as
        # netem's default and a veth's txqueuelen. A queue bounded in time
        # instead (tbf's latency 50ms) holds a few dozen frames at 10 Mbit/s:
        # TCP then loses so much that it waits on retransmission timeouts and
        # gets 15% less than the rate (measured with tools/bench_link.py).
        return [["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf", "rate", f"{imp.rate}bit",
                 "burst", str(burst), "limit", str(DEFAULT_LIMIT * (mtu + 14))]]
    return [["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
            ["tc", "class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate",
             f"{imp.rate}bit", "ceil", f"{imp.rate}bit", "burst", str(burst), "cburst", str(burst)],
            ["tc", "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", "pfifo", "limit",
             str(imp.limit)]]


def tap_name(dev: str) -> str:
    """The delay line's tap for DEV (an interface name has 15 characters)."""
    return "dly" + short_hash(dev, 8)


def table_name(dev: str) -> str:
    """One table per impaired device: a namespace may hold several (the fabric
    holds every node's port)."""
    return f"{TABLE}-{dev}"


def _chance(ppm: int) -> str:
    """The match that is true for PPM packets in a million: numgen's random
    number in 0..999999 below PPM, or every packet (numgen cannot compare with
    a number it never makes)."""
    return "" if ppm >= PPM else f"numgen random mod {PPM} < {ppm} "


def nft_ruleset(dev: str, imp: Impairment, what: str) -> str:
    """One nft transaction that (re)writes DEV's table, or only deletes it when
    IMP has no loss and no duplication. WHAT names the link in the comments."""
    table = table_name(dev)
    out = [f"table netdev {table} {{}}", f"delete table netdev {table}"]
    if imp.loss or imp.duplicate or imp.delay:
        into_delay = f'fwd to "{tap_name(dev)}"'
        out += [f"table netdev {table} {{",
                "  chain egress {",
                f'    type filter hook egress device "{dev}" priority 0; policy accept;']
        if imp.delay:
            out.append(f"    meta mark {DELAY_MARK:#x} counter meta mark set 0 accept "
                       f"comment \"{what}: out of the delay line\"")
        if imp.duplicate:
            # The copy is delayed as its original is, and nothing else.
            out.append(f"    meta mark {DUP_MARK:#x} counter meta mark set 0 {into_delay if imp.delay else 'accept'} "
                       f"comment \"{what}: a copy made by duplicate, not impaired again\"")
        if imp.loss:
            out.append(f"    {_chance(imp.loss)}counter drop "
                       f"comment \"{what}: loss {format_ppm(imp.loss)}\"")
        if imp.duplicate:
            out.append(f"    {_chance(imp.duplicate)}counter meta mark set {DUP_MARK:#x} "
                       f"dup to \"{dev}\" meta mark set 0 "
                       f"comment \"{what}: duplicate {format_ppm(imp.duplicate)}\"")
        if imp.delay:
            out.append(f"    counter {into_delay} comment \"{what}: into the delay line, "
                       f"delay {format_duration(imp.delay)}\"")
        out += ["  }", "}"]
    return "\n".join(out) + "\n"
