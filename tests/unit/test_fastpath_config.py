"""The udp fast path's switches and shared counters (no root needed)."""

from __future__ import annotations

import ipaddress
import mmap
import os

import pytest

from netemu.overlay import fastudp, udp


def test_offload_switches():
    assert udp.offload_wanted("node1", {"Type": "udp"}, environ={})
    assert not udp.offload_wanted("node1", {"Type": "udp", "Offload": False}, environ={})
    env = {udp.NO_OFFLOAD_ENV: "node2, node3"}
    assert udp.offload_wanted("node1", {}, environ=env)
    assert not udp.offload_wanted("node3", {}, environ=env)
    assert not udp.offload_wanted("node1", {}, environ={udp.NO_OFFLOAD_ENV: "*"})


def test_both_paths_count_the_same_things():
    assert set(udp.COUNTERS) == set(fastudp.COUNTERS)


def test_counters_are_summed_over_both_directions():
    fd = fastudp.counters_memory()
    try:
        shared = mmap.mmap(fd, fastudp.BLOCK * len(fastudp.DIRECTIONS))
        blocks = [memoryview(shared)[i * fastudp.BLOCK:(i + 1) * fastudp.BLOCK].cast("q")
                  for i in range(len(fastudp.DIRECTIONS))]
        tx = fastudp.COUNTERS.index("tx_packets")
        blocks[0][tx] += 5
        blocks[1][tx] += 2
        blocks[1][fastudp.COUNTERS.index("rx_coalesced")] += 1
        got = fastudp.read_counters(fd)
        assert got["tx_packets"] == 7 and got["rx_coalesced"] == 1 and got["drop_ttl"] == 0
        for b in blocks:
            b.release()
        shared.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("release,expected", [
    ("6.18.44-fc-v782", True), ("6.2.0", True), ("6.1.0-13-amd64", False), ("5.15.0", False),
    ("7.0", True), ("weird", False),
])
def test_udp_gso_writes_into_the_tun_need_linux_6_2(release, expected):
    assert fastudp.udp_gso_writes(release) is expected


def test_a_workers_next_hops_follow_the_peer_table():
    peers = fastudp.Peers()
    pod = int(ipaddress.IPv4Address("10.244.2.5"))
    assert peers.next_hop(pod) is None
    peers.replace({"10.244.2.0/24": "172.30.0.12", "10.244.3.0/24": "172.30.0.13"})
    assert peers.next_hop(pod) == "172.30.0.12"
    assert peers.next_hop(pod) == "172.30.0.12"            # remembered
    peers.replace({"10.244.2.0/24": "172.30.0.14"})         # the subnet moved: nothing stale
    assert peers.next_hop(pod) == "172.30.0.14"
    peers.replace({})
    assert peers.next_hop(pod) is None
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    for i in range(fastudp.Peers.CACHE_LIMIT + 100):         # a scan of many addresses: bounded
        peers.next_hop(base + i)
    assert len(peers.table[1]) <= fastudp.Peers.CACHE_LIMIT


def test_a_peer_may_send_its_pods_its_flannel0_and_its_own_underlay_address():
    """A NodePort or hostPort reply is un-NATed on the peer before the tunnel: its
    inner source is the peer's underlay address, which is no forgery."""
    peers = fastudp.Peers()
    peers.replace({"10.244.2.0/24": "172.30.0.12", "10.244.3.0/24": "172.30.0.13"})
    ip = lambda text: int(ipaddress.IPv4Address(text))      # noqa: E731
    assert peers.leased_by("172.30.0.12", ip("10.244.2.5"))         # its pod
    assert peers.leased_by("172.30.0.12", ip("10.244.2.0"))         # its flannel0
    assert peers.leased_by("172.30.0.12", ip("172.30.0.12"))        # its own address
    assert not peers.leased_by("172.30.0.12", ip("172.30.0.13"))    # another node's address
    assert not peers.leased_by("172.30.0.12", ip("10.244.3.5"))     # another node's pod
    assert not peers.leased_by("172.30.0.99", ip("172.30.0.99"))    # not a peer at all
    peers.replace({"10.244.3.0/24": "172.30.0.13"})                 # gone from the table
    assert not peers.leased_by("172.30.0.12", ip("172.30.0.12"))
