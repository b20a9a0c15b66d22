"""Subnet leases, as flannel's subnet manager keeps them in etcd.

The network config lives at <prefix>/config, each node's lease at
<prefix>/subnets/<a.b.c.d>-<len> with a TTL. A lease is written only if no one
holds that subnet (a conditional create in the store), and renewed before it
expires. Peers learn of each other by watching <prefix>/subnets/.

Which subnet a node gets, in order (flannel's rules, plus a topology hint):
  1. the one in its subnet.env from a previous run, if still free or its own;
  2. a lease already held for its public IP (flannel reuses those);
  3. the subnet the topology requested for the node (podCIDR), if free;
  4. a random free subnet between SubnetMin and SubnetMax, none that the
     topology requested for another node (the tutorial's node2 asks for
     192.168.96.0/24: a node that leased before it, by chance, must not take
     it), those only when no other is left (as an IPAM hands out the CIDRs
     not in use).
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any, Iterator

from netemu.overlay.backend import Lease

PREFIX = "/coreos.com/network"
CONFIG_KEY = f"{PREFIX}/config"
SUBNETS = f"{PREFIX}/subnets/"
REQUESTED_POD_CIDR = "netemu.io/requested-pod-cidr"     # a Node's annotation: the topology's podCIDR
LEASE_TTL = 24 * 3600.0
RENEW_MARGIN = 3600.0


def network_config(network: ipaddress.IPv4Network, subnet_len: int, backend: dict[str, Any]) -> dict:
    """flannel's network config object, with SubnetMin/Max as flannel defaults them:
    the second subnet to the last one (the first is left out, as flannel does)."""
    size = 2 ** (32 - subnet_len)
    smin = network.network_address + size
    smax = network.broadcast_address - size + 1
    return {"Network": str(network), "SubnetLen": subnet_len,
            "SubnetMin": str(smin), "SubnetMax": str(smax), "Backend": backend}


def _subnet_space(config: dict) -> tuple[int, int, int, int]:
    """(first index, last index, network address, subnet size) of the subnets
    between SubnetMin and SubnetMax: subnet i starts at network + i * size."""
    network = ipaddress.IPv4Network(config["Network"])
    plen = int(config["SubnetLen"])
    size = 2 ** (32 - plen)
    base = int(network.network_address)
    smin = int(ipaddress.IPv4Address(config.get("SubnetMin", network.network_address)))
    smax = int(ipaddress.IPv4Address(config.get("SubnetMax", network.broadcast_address)))
    first = max(0, -(-(smin - base) // size))                 # round up: start at or after SubnetMin
    last = min(network.num_addresses // size - 1, (smax - base) // size)
    return first, last, base, size


def _subnet_at(config: dict, index: int) -> ipaddress.IPv4Network:
    _, _, base, size = _subnet_space(config)
    return ipaddress.IPv4Network((base + index * size, int(config["SubnetLen"])))


def candidate_subnets(config: dict) -> list[ipaddress.IPv4Network]:
    first, last, _, _ = _subnet_space(config)
    return [_subnet_at(config, i) for i in range(first, last + 1)]


# Random probes before the ordered scan: with a few leases in a large network
# nearly every probe is free, so a node finds its subnet without the daemon ever
# listing the network's subnets (a /9 cut into /30s holds two million).
RANDOM_PROBES = 64


def free_subnets(config: dict, held, rng: random.Random) -> Iterator[ipaddress.IPv4Network]:
    """Subnets no lease in HELD holds, in random order: RANDOM_PROBES random
    picks, then every subnet once from a random start (so a nearly full network
    is still searched to the end). Lazy: nothing is listed up front."""
    first, last, _, _ = _subnet_space(config)
    count = last - first + 1
    if count <= 0:
        return
    tried = set()
    for _ in range(min(RANDOM_PROBES, count)):
        i = first + rng.randrange(count)
        subnet = _subnet_at(config, i)
        if i not in tried and subnet not in held:
            yield subnet
        tried.add(i)
    start = rng.randrange(count)
    for k in range(count):
        i = first + (start + k) % count
        if i not in tried:
            subnet = _subnet_at(config, i)
            if subnet not in held:
                yield subnet


def lease_key(subnet: ipaddress.IPv4Network) -> str:
    return f"{SUBNETS}{subnet.network_address}-{subnet.prefixlen}"


def read_leases(store) -> list[Lease]:
    out = []
    for kv in store.list(SUBNETS):
        try:
            out.append(Lease.from_json(kv.key[len(SUBNETS):], kv.value))
        except (KeyError, ValueError):
            continue
    return out


def preferred_subnets(config: dict, public_ip: ipaddress.IPv4Address, leases: list[Lease],
                      previous: ipaddress.IPv4Network | None,
                      requested: ipaddress.IPv4Network | None,
                      rng: random.Random, reserved=frozenset()) -> Iterator[ipaddress.IPv4Network]:
    """Subnets to try, best first, lazily (pure: the caller creates the lease).
    RESERVED: subnets requested for other nodes, tried last."""
    held = {l.subnet: l for l in leases}
    choices: list[ipaddress.IPv4Network] = []

    def free_or_ours(s):
        lease = held.get(s)
        return lease is None or lease.public_ip == public_ip

    if previous is not None and free_or_ours(previous):
        choices.append(previous)
    choices += [l.subnet for l in leases if l.public_ip == public_ip]
    if requested is not None and free_or_ours(requested):
        choices.append(requested)
    seen = set()
    for s in choices:
        if s not in seen:
            seen.add(s)
            yield s
    reserved = set(reserved) - seen
    for s in free_subnets(config, held.keys() | reserved, rng):
        if s not in seen:
            seen.add(s)
            yield s
    for s in sorted(reserved):
        if s not in held:
            yield s


def acquire(store, config: dict, public_ip, node: str, backend_type: str, backend_data: dict,
            previous=None, requested=None, rng: random.Random | None = None, reserved=frozenset()) -> Lease:
    """Lease a subnet for this node: create-if-absent, or take over our own lease.
    RESERVED: subnets requested for other nodes (preferred_subnets)."""
    rng = rng or random.Random()
    for subnet in preferred_subnets(config, public_ip, read_leases(store), previous, requested, rng,
                                    reserved):
        lease = Lease(subnet=subnet, public_ip=public_ip, backend_type=backend_type,
                      backend_data=backend_data, node=node)
        key = lease_key(subnet)
        current = store.get(key)
        if current is None:
            if store.create(key, lease.to_json(), ttl=LEASE_TTL) is not None:
                return lease
        elif current.value.get("PublicIP") == str(public_ip):
            # Ours from an earlier run: rewrite it (new backend data), same subnet.
            store.put(key, lease.to_json(), ttl=LEASE_TTL, expect_revision=current.mod_revision)
            return lease
    raise RuntimeError(f"no free subnet left in {config['Network']}")


def renew(store, lease: Lease) -> None:
    store.put(lease_key(lease.subnet), lease.to_json(), ttl=LEASE_TTL)


def release(store, lease: Lease) -> None:
    store.delete(lease_key(lease.subnet))
