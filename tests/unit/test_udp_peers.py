"""The udp backend tells its workers the peer table once per batch of lease
changes (flush_peers), not once per change."""

import io
import ipaddress

from netemu.overlay import fastudp
from netemu.overlay.backend import Lease, LocalConfig
from netemu.overlay.udp import UdpBackend


class Worker:
    def __init__(self):
        self.stdin = io.BytesIO()


def lease(i: int) -> Lease:
    return Lease(subnet=ipaddress.IPv4Network(f"10.244.{i}.0/24"), public_ip=ipaddress.IPv4Address(f"172.30.0.{i}"),
                 backend_type="udp", backend_data={}, node=f"n{i}")


def test_workers_get_the_table_once_per_flush():
    backend = UdpBackend(LocalConfig(node="n1", network=ipaddress.IPv4Network("10.244.0.0/16"),
                                     public_ip=ipaddress.IPv4Address("172.30.0.1"), underlay_dev="eth0",
                                     underlay_mtu=1500, backend_conf={}, state_dir="/nonexistent"))
    backend.lease = lease(1)
    tx, rx = Worker(), Worker()
    backend._workers = {"tx": tx, "rx": rx}
    for i in range(2, 50):
        backend.add_peer(lease(i))
    backend.add_peer(lease(1))                          # our own: no peer
    backend.remove_peer(lease(7))
    assert tx.stdin.getvalue() == rx.stdin.getvalue() == b""
    backend.flush_peers()
    table = {f"10.244.{i}.0/24": f"172.30.0.{i}" for i in range(2, 50) if i != 7}
    for worker in (tx, rx):
        lines = worker.stdin.getvalue().splitlines(keepends=True)
        assert len(lines) == 1 and fastudp.parse_peer_line(lines[0].decode()) == table
    backend.flush_peers()                               # nothing changed: nothing said
    backend.remove_peer(lease(99))                      # not a peer: nothing changed
    backend.flush_peers()
    assert len(tx.stdin.getvalue().splitlines()) == 1
    backend.remove_peer(lease(2))
    backend.flush_peers()
    assert len(tx.stdin.getvalue().splitlines()) == 2
