import ipaddress
import threading

import pytest

from netemu.node.ipam import ExhaustedError, HostLocalIPAM

NET = ipaddress.IPv4Network("10.244.1.0/29")
GW = ipaddress.IPv4Address("10.244.1.1")


def test_addresses_are_unique_and_skip_gateway(tmp_path):
    ipam = HostLocalIPAM(str(tmp_path), NET, GW)
    got = [ipam.allocate(f"pod{i}") for i in range(5)]
    assert len(set(got)) == 5
    assert GW not in got
    assert all(ip in NET and ip not in (NET.network_address, NET.broadcast_address) for ip in got)
    with pytest.raises(ExhaustedError):
        ipam.allocate("pod-too-many")


def test_same_owner_gets_same_address(tmp_path):
    ipam = HostLocalIPAM(str(tmp_path), NET, GW)
    assert ipam.allocate("a") == ipam.allocate("a")


def test_release_frees_but_does_not_reuse_at_once(tmp_path):
    ipam = HostLocalIPAM(str(tmp_path), NET, GW)
    a = ipam.allocate("a")
    ipam.release("a")
    assert ipam.find("a") is None
    b = ipam.allocate("b")
    assert b != a
    # A restarted agent (a new object on the same folder) sees the same state.
    again = HostLocalIPAM(str(tmp_path), NET, GW)
    assert again.find("b") == b


def test_concurrent_allocation_never_duplicates(tmp_path):
    net = ipaddress.IPv4Network("10.244.2.0/24")
    gw = ipaddress.IPv4Address("10.244.2.1")
    results = []
    lock = threading.Lock()

    def worker(n):
        ipam = HostLocalIPAM(str(tmp_path), net, gw)
        for i in range(20):
            ip = ipam.allocate(f"w{n}-{i}")
            with lock:
                results.append(ip)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 80 and len(set(results)) == 80
