"""What an overlay backend is, as flannel defines it (pkg/backend/common.go).

The daemon (netemu.overlay.daemon) owns the subnet lease and watches the other
nodes' leases; a backend only turns leases into forwarding state. Each backend
lives in its own module and registers itself by name, so adding one touches
nothing else.

Every method runs inside the node's network namespace: the daemon process entered
it at start-up, so a plain pyroute2 IPRoute() or socket() is already the node's.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Callable, ClassVar

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address


@dataclasses.dataclass(frozen=True)
class Lease:
    """One node's subnet lease, as stored under <prefix>/subnets/<a.b.c.d-len>."""

    subnet: IPv4Network
    public_ip: IPv4Address          # the node's underlay address
    backend_type: str
    backend_data: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    node: str = ""                  # our addition: the node's name, for humans

    def key_name(self) -> str:
        return f"{self.subnet.network_address}-{self.subnet.prefixlen}"

    def to_json(self) -> dict[str, Any]:
        return {"PublicIP": str(self.public_ip), "BackendType": self.backend_type,
                "BackendData": self.backend_data, "Node": self.node}

    @classmethod
    def from_json(cls, key_name: str, value: dict[str, Any]) -> "Lease":
        net, _, plen = key_name.partition("-")
        return cls(subnet=ipaddress.IPv4Network(f"{net}/{plen}"),
                   public_ip=ipaddress.IPv4Address(value["PublicIP"]),
                   backend_type=value.get("BackendType", ""),
                   backend_data=dict(value.get("BackendData") or {}),
                   node=value.get("Node", ""))


@dataclasses.dataclass
class LocalConfig:
    """What a backend knows about its own node when it starts."""

    node: str
    network: IPv4Network            # the whole cluster network (e.g. 10.244.0.0/16)
    public_ip: IPv4Address          # this node's underlay address
    underlay_dev: str               # "eth0"
    underlay_mtu: int
    backend_conf: dict[str, Any]    # the config's "Backend" object (Type, Port, VNI...)
    state_dir: str                  # the node's folder under /run/netemu/<cluster>/


class Backend:
    """Base class; subclasses set `name` and implement the hooks they need."""

    name: ClassVar[str] = ""
    overhead: ClassVar[int] = 0     # bytes of encapsulation (udp 28, vxlan 50, host-gw 0)
    # Names in `counters` that say how things are (how many peers), not how
    # often something happened: the daemon carries the others over a restart.
    gauges: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, local: LocalConfig):
        self.local = local
        self.lease: Lease | None = None
        self.counters: dict[str, int] = {}
        self._ipr = None

    def _netlink(self):
        """An rtnetlink socket (pyroute2's IPRoute, in our namespace) for the
        current batch of peer changes: one per batch, not one per peer (at
        100 nodes, 9,900 sockets opened during `up`); _close_netlink ends it
        (flush_peers, teardown)."""
        if self._ipr is None:
            from pyroute2 import IPRoute
            self._ipr = IPRoute()
        return self._ipr

    def _close_netlink(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def mtu(self) -> int:
        return self.local.underlay_mtu - self.overhead

    def backend_data(self) -> dict[str, Any]:
        """BackendData to publish in this node's lease (vxlan: VtepMAC)."""
        return {}

    def data_path(self) -> str:
        """Who moves the packets, for `netemu describe node` / `netemu stats`."""
        return "kernel"

    def setup(self, lease: Lease) -> None:
        """Create devices and routes for our own lease (flannel0, flannel.1 ...)."""
        self.lease = lease

    def add_peer(self, lease: Lease) -> None:
        """A remote node's lease appeared or changed."""

    def remove_peer(self, lease: Lease) -> None:
        """A remote node's lease expired or was deleted."""

    def flush_peers(self) -> None:
        """The changes of add_peer and remove_peer since the last call take
        effect now if they have not yet (udp: its workers get the new table
        once per batch of lease events, not once per event). Called before
        the daemon says its peers are in place (synced.mark)."""

    def peers_synced(self) -> None:
        """Every lease in the store has been through add_peer: what the backend
        still holds for a peer it was not told about is stale (left by a
        daemon before this one)."""

    async def run(self) -> None:
        """The data path, for backends that have one in userspace (udp). Runs until
        cancelled; the kernel backends return at once."""

    def worker_pids(self) -> dict[str, int]:
        """Process ids of the backend's data path workers, by role (udp: tx, rx)."""
        return {}

    def teardown(self) -> None:
        """Remove what setup/add_peer made (the namespace goes anyway on `down`)."""


BACKENDS: dict[str, Callable[[LocalConfig], Backend]] = {}


def register(cls):
    BACKENDS[cls.name] = cls
    return cls


def load(name: str, local: LocalConfig) -> Backend:
    # Import the modules so they register themselves.
    from netemu.overlay import hostgw, udp, vxlan  # noqa: F401
    try:
        return BACKENDS[name](local)
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})") from None
