"""Which subnet a node's overlay daemon leases (netemu.overlay.leases)."""

import ipaddress
import random

from netemu.overlay import leases
from netemu.overlay.backend import Lease

from tests.unit.test_controllers_support import open_store

NET = leases.network_config(ipaddress.IPv4Network("10.244.0.0/22"), 24, {})     # 10.244.1-3.0/24 (flannel's SubnetMin skips .0)
WANTED = ipaddress.IPv4Network("10.244.2.0/24")


def test_a_subnet_requested_for_another_node_is_taken_last():
    """A node without a podCIDR of its own does not take the one the topology
    asks for another node (whichever leases first), unless nothing else is free."""
    me = ipaddress.IPv4Address("10.1.96.231")
    for seed in range(50):
        choices = list(leases.preferred_subnets(NET, me, [], None, None, random.Random(seed), {WANTED}))
        assert choices[-1] == WANTED and sorted(choices) == leases.candidate_subnets(NET), (seed, choices)
    held = [Lease(subnet=s, public_ip=ipaddress.IPv4Address(f"10.1.96.{i}"), backend_type="udp",
                  backend_data={}, node=f"n{i}")
            for i, s in enumerate(leases.candidate_subnets(NET)) if s != WANTED]
    assert list(leases.preferred_subnets(NET, me, held, None, None, random.Random(1), {WANTED})) == [WANTED]
    # the node that asked for it gets it first
    assert next(leases.preferred_subnets(NET, me, [], None, WANTED, random.Random(1), {WANTED})) == WANTED


def test_the_node_asking_gets_its_subnet_whoever_leased_before_it(tmp_path):
    store = open_store(tmp_path)
    for seed in range(20):
        first = leases.acquire(store, NET, ipaddress.IPv4Address("10.1.96.232"), "node1", "udp", {},
                               rng=random.Random(seed), reserved={WANTED})
        second = leases.acquire(store, NET, ipaddress.IPv4Address("10.1.96.233"), "node2", "udp", {},
                                requested=WANTED, rng=random.Random(seed))
        assert first.subnet != WANTED and second.subnet == WANTED
        leases.release(store, first)
        leases.release(store, second)
