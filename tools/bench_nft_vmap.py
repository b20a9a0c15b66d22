#!/usr/bin/env python3
"""What kube-proxy's own spread rule would cost this kernel: `numgen random mod N
vmap { 0 : goto endpoint-A, 1 : goto endpoint-B }` per service (an anonymous
verdict map each) against netemu's cascade (`numgen random mod 2 0 goto
endpoint-A`, `goto endpoint-B`; netemu/proxy/nftables.py). Run as root, alone.

For each size, one full load of N services x 2 endpoints into a table with the
proxy's skeleton, sent as one nf_tables netlink batch either way (the messages
nft sends for the vmap: NEWSET "__mapI" anonymous|constant|map with verdict
data, NEWSETELEM, NEWRULE numgen + lookup to the verdict register, the set
named and given by its batch id), and then one small change (one rule added
to an endpoint chain: the kernel re-validates the table). Figures: the
kernel's own time, the sendmsg() that carries the batch (the kernel applies
and commits the transaction inside it); shapes alternate within a round.

    sudo .venv/bin/python tools/bench_nft_vmap.py --sizes 1000,2500,5000,10000 --rounds 2

Namespaces: tools/bench_proxy.py's hs-bench-*, deleted at the end; the lock
is its /run/netemu-bench.lock.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_proxy as bp  # noqa: E402
from netemu import netns  # noqa: E402
from netemu.proxy import nftables as nft  # noqa: E402
from netemu.proxy import nftnl as N  # noqa: E402
from netemu.proxy import proxier as pm  # noqa: E402

SET_ANONYMOUS, SET_CONSTANT, SET_MAP = 0x1, 0x2, 0x8
DATA_VERDICT = 0xFFFFFF00                # NFT_DATA_VERDICT
TYPE_INTEGER = 4                         # nft's datatype id of numgen's result
SHAPES = ("cascade", "vmap")


def _vmap_rule(b: N.Batch, chain: str, set_name: str, set_id: int, targets: list[str]) -> None:
    """numgen random mod len(TARGETS) vmap { i : goto TARGETS[i] }, as nft sends it."""
    attrs = (N._TABLE_ATTR + N._str(2, set_name) + N._u32(3, SET_ANONYMOUS | SET_CONSTANT | SET_MAP) +
             N._u32(4, TYPE_INTEGER) + N._u32(5, 4) + N._u32(6, DATA_VERDICT) + N._u32(10, set_id) +
             N._nest(9, N._u32(1, len(targets))))                       # desc: size
    b._msg(N.MSG_NEWSET, N.NLM_F_REQUEST | N.NLM_F_CREATE, attrs, (N.MSG_NEWSET, set_name))
    elems = b"".join(N._nest(k + 1, N._nest(1, N._attr(1, struct.pack("=I", k))),
                             N._verdict(2, N.NFT_GOTO, t)) for k, t in enumerate(targets))
    attrs = N._TABLE_ATTR + N._str(2, set_name) + N._nest(3, elems) + N._u32(4, set_id)
    b._msg(N.MSG_NEWSETELEM, N.NLM_F_REQUEST | N.NLM_F_CREATE, attrs, (N.MSG_NEWSETELEM, set_name, len(targets)))
    lookup = N._expr("lookup", N._str(1, set_name), N._u32(2, N.REG_1), N._u32(3, N.REG_VERDICT),
                     N._u32(4, set_id))
    attrs = N._TABLE_ATTR + N._str(2, chain) + N._attr(4 | N.NLA_F_NESTED, N.e_numgen(len(targets)) + lookup)
    b._msg(N.MSG_NEWRULE, N.NLM_F_REQUEST | N.NLM_F_CREATE | N.NLM_F_APPEND, attrs, (N.MSG_NEWRULE, chain, "vmap"))


def full_load(n: int, shape: str) -> N.Batch:
    """N services as the proxy lays them out (a service chain with its masquerade
    rule and spread, two endpoint chains with hairpin and dnat, a service-ips
    element), the spread in SHAPE."""
    b = N.Batch()
    elements = []
    for i in range(n):
        vip, pods = f"10.96.{i // 250}.{i % 250 + 1}", [f"10.244.{i // 120}.{2 * (i % 120) + k + 2}" for k in (0, 1)]
        svc = f"service-{i:05d}-bench/svc-{i}/tcp/http"
        eps = [f"endpoint-{i:05d}-{k}-bench/svc-{i}/tcp/http__{ip}/8080" for k, ip in enumerate(pods)]
        b.add_chain(svc)
        for ep, ip in zip(eps, pods):
            b.add_chain(ep)
            b.add_rules(ep, [f"ip saddr {ip} jump {nft.MARK_MASQ_CHAIN}", f"meta l4proto tcp dnat to {ip}:8080"])
        b.add_rules(svc, [f"ip daddr {vip} tcp dport 80 ip saddr != {bp.CIDR} jump {nft.MARK_MASQ_CHAIN}"])
        if shape == "cascade":
            b.add_rules(svc, [f"numgen random mod 2 0 goto {eps[0]}", f"goto {eps[1]}"])
        else:
            _vmap_rule(b, svc, f"__map{i}", i + 1, eps)
        elements.append((f"{vip} . tcp . 80", (f"goto {svc}", f"bench/svc-{i}:http")))
    b.add_elements(nft.SERVICE_IPS, elements)
    return b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,2500,5000,10000", help="service counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[tuple, list[float]] = {}
    with open(bp.LOCK, "w") as lock:
        print(f"waiting for {bp.LOCK} ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        bp.delete_node(netns)
        try:
            bp.build_node(netns)
            with netns.inside(bp.NODE):
                proxier = pm.make_proxier("nftables", "node-1", [bp.NODE_IP], bp.CIDR)
                sock = N.NftNetlink()
                try:
                    for rnd in range(args.rounds):
                        for n in sizes:
                            for shape in (SHAPES if rnd % 2 == 0 else SHAPES[::-1]):
                                proxier.nft.run("\n".join(nft.skeleton_commands()) + "\n")
                                batch = full_load(n, shape)
                                sock.send(batch)
                                load = sock.last_send_seconds
                                change = N.Batch()
                                change.add_rules("endpoint-00000-0-bench/svc-0/tcp/http__10.244.0.2/8080",
                                                 [f"ip saddr 10.244.0.9 jump {nft.MARK_MASQ_CHAIN}"])
                                sock.send(change)
                                results.setdefault((n, shape, "full load"), []).append(load)
                                results.setdefault((n, shape, "one change"), []).append(sock.last_send_seconds)
                                proxier.nft.run(nft.cleanup_transaction())
                                print(f"round {rnd + 1} {n:6d} {shape:8s} {len(batch)} messages: full load "
                                      f"{load * 1000:.1f} ms, one change {sock.last_send_seconds * 1000:.2f} ms "
                                      "(kernel)", flush=True)
                finally:
                    sock.close()
                    proxier.close()
        finally:
            bp.delete_node(netns)
    print("\nkernel time, median [min-max] over rounds; vmap / cascade of the medians")
    for n in sizes:
        parts = []
        for what in ("full load", "one change"):
            runs = {shape: results[(n, shape, what)] for shape in SHAPES}
            meds = {shape: statistics.median(v) for shape, v in runs.items()}
            parts.append(f"{what} " + ", ".join(
                f"{shape} {meds[shape] * 1000:.1f} ms [{min(v) * 1000:.1f}-{max(v) * 1000:.1f}]"
                for shape, v in runs.items()) + f" ({meds['vmap'] / meds['cascade']:.2f}x)")
        print(f"{n:6d} services: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
