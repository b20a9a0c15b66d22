"""Links: the veth pairs that connect namespaces, and what each one is like.

Every cable of the emulated cluster is a veth pair: a node's uplink (its eth0 and
its port on the fabric bridge), the external client's and the load balancer's
uplinks, a pod's eth0 and its vethXXXXXXX on docker0. A Link knows its two ends,
its MTU, its offload settings and its impairment (rate, loss: see
netemu.impairment), and builds itself; nothing else in netemu runs `ip link add
... type veth`.

The near end is made first, in the near namespace (the switch side: the fabric,
or the node for a pod), and is the one that joins a bridge; the far end is moved
into the far namespace (the host side) and gets the address.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from netemu import netns
from netemu.impairment import Impairment, nft_ruleset, table_name, tc_commands


@dataclasses.dataclass(frozen=True)
class End:
    namespace: str
    name: str


# TCP segmentation offloads (what `ethtool -K IFACE tso off` turns off).
TSO_FEATURES = ("tx-tcp-segmentation", "tx-tcp-ecn-segmentation", "tx-tcp-mangleid-segmentation",
                "tx-tcp6-segmentation")


@dataclasses.dataclass
class Link:
    near: End
    far: End
    mtu: int
    bridge: str | None = None           # the bridge the near end is a port of
    hairpin: bool = False               # the bridge may send a frame back out of this port
    far_mac: str | None = None
    far_address: str | None = None      # "10.244.1.2/24"
    # Segments per TSO burst of the far end (0: the kernel's default).
    far_gso_max_segs: int = 0
    # TCP segmentation offload of the near end. Off for the udp backend's node
    # uplinks: a veth hands the receiving side's GRO (and so the overlay daemon's
    # UDP GRO socket) merged datagrams only when the sending end has TSO off;
    # measured, this more than doubles the udp backend's TCP throughput (0.021x ->
    # 0.048x host-gw). The frames on the wire are the same.
    near_tso: bool = True
    impairment: Impairment | None = None    # applied by create (see impair)

    def commands(self) -> tuple[list[str], list[str]]:
        """The `ip -batch` lines for the near and the far namespace (pure)."""
        near = [
            # "name" before each interface name: a node called "master" or "up"
            # must not be read as one of ip's keywords.
            f"link add name {self.near.name} mtu {self.mtu} type veth peer name {self.far.name} "
            f"mtu {self.mtu} netns {self.far.namespace}",
            f"link set dev {self.near.name}" + (f" master {self.bridge}" if self.bridge else "") + " up",
        ]
        if self.hairpin:
            near.append(f"link set dev {self.near.name} type bridge_slave hairpin on")
        far = []
        if self.far_mac:
            far.append(f"link set dev {self.far.name} address {self.far_mac}")
        if self.far_address:
            far.append(f"addr add {self.far_address} dev {self.far.name}")
        if self.far_gso_max_segs:
            far.append(f"link set dev {self.far.name} gso_max_segs {self.far_gso_max_segs}")
        far.append(f"link set dev {self.far.name} up")
        return near, far

    def create(self, far_before: Sequence[str] = (), far_after: Sequence[str] = ()) -> None:
        """Make the pair. FAR_BEFORE and FAR_AFTER are more `ip` lines for the far
        namespace (its lo, its routes), run in the same process as the link's."""
        near, far = self.commands()
        netns.ip_batch(self.near.namespace, near)
        netns.ip_batch(self.far.namespace, [*far_before, *far, *far_after])
        if not self.near_tso:
            set_tso(self.near, False)
        if self.impairment:
            self.impair(self.impairment)

    def impair(self, imp: Impairment) -> None:
        """Set the link's impairment, in both directions: each end's egress gets
        the rate (a root qdisc) and the loss and duplication (an nft table of its
        own), so what one end sends is impaired before the other receives it. An
        empty Impairment removes everything a previous one put there."""
        for end, other in ((self.near, self.far), (self.far, self.near)):
            what = f"{end.name} -> {other.namespace}/{other.name}"
            netns.run(end.namespace, ["nft", "-f", "-"], input=nft_ruleset(end.name, imp, what))
            # Start from the veth's default (no queue): replacing tbf by htb, or
            # back, must leave no stale child. Deleting a root qdisc that is not
            # there fails harmlessly.
            netns.run(end.namespace, ["tc", "qdisc", "del", "dev", end.name, "root"], check=False)
            commands = tc_commands(end.name, imp, self.mtu)
            for argv in commands:
                netns.run(end.namespace, argv)
        self.impairment = imp

    def installed(self) -> dict:
        """What the kernel holds for this link's impairment, per end (read back,
        for `link show` and tests): root qdisc kinds and nft table names."""
        import json
        out = {}
        for end in (self.near, self.far):
            qdiscs = json.loads(netns.run(end.namespace, ["tc", "-j", "qdisc", "show", "dev", end.name]).stdout
                                or "[]")
            tables = netns.run(end.namespace, ["nft", "list", "tables", "netdev"]).stdout.split()
            out[f"{end.namespace}/{end.name}"] = {
                "qdiscs": [q["kind"] for q in qdiscs if q.get("kind") not in ("noqueue",)],
                "nftables": [t for t in tables if t == table_name(end.name)],
            }
        return out


def set_tso(end: End, on: bool) -> None:
    """Turn TCP segmentation offload of END on or off."""
    from pyroute2.ethtool import Ethtool

    with netns.inside(end.namespace):
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(end.name)
            for name in TSO_FEATURES:
                if name in features.features:
                    features.features[name].enable = on
            ethtool.set_features(end.name, features)
        finally:
            ethtool.close()
