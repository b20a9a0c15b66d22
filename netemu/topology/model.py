"""The validated topology model: what a cluster is made of, as plain data.

This is the loader's output and the cluster builder's input. Nothing here touches
the machine; a Topology can be built and inspected without root (like Mininet's
Topo). The loader (netemu.topology.loader) fills these classes from a topology
file and guarantees the invariants written next to each field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from netemu.impairment import Impairment

BACKENDS = ("udp", "vxlan", "host-gw")
PROXY_MODES = ("nftables", "iptables")

# flannel's defaults (pkg/backend/udp, pkg/backend/vxlan): 8472 is the Linux
# kernel's VXLAN port, not IANA's 4789.
DEFAULT_BACKEND_PORTS = {"udp": 8285, "vxlan": 8472}

# How many underlay addresses the default LoadBalancer pool takes from the top of
# the underlay (the client's address is one of them and is left out).
DEFAULT_LB_POOL_SPAN = 16


# Longest part of an error or warning line. Messages quote the offending value
# (a name, a key, a string), and the value may be a megabyte long: the line is
# cut so that one bad field cannot flood a terminal or a log.
WHERE_MAX = 300
PROBLEM_MAX = 500


def one_line(text, limit: int) -> str:
    """TEXT on one line (whitespace runs become one space), at most about LIMIT
    characters: a longer text is cut and says how much was left out."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class TopologyError(ValueError):
    """Bad input. str(e) is one line: "<file>: <where>: <problem>", each part
    cut to a sane length (one_line)."""

    # The field path alone ("spec.replicas") when the error is about one field of
    # a Kubernetes object, for messages in the API server's form; set by the
    # manifest checks (manifests.Origin.error).
    field = ""

    def __init__(self, file, where, problem):
        self.file = one_line(file, WHERE_MAX)
        self.where = one_line(where, WHERE_MAX)
        self.problem = one_line(problem, PROBLEM_MAX)  # one line, whatever PyYAML said
        parts = [p for p in (self.file, self.where, self.problem) if p]
        super().__init__(": ".join(parts))


@dataclass
class ClusterSettings:
    underlay: IPv4Network = IPv4Network("172.30.0.0/24")
    underlay_mtu: int = 1500
    cluster_network: IPv4Network = IPv4Network("10.244.0.0/16")
    subnet_len: int = 24
    service_range: IPv4Network = IPv4Network("10.96.0.0/16")
    node_port_range: tuple[int, int] = (30000, 32767)
    backend: str = "udp"            # udp | vxlan | host-gw
    backend_port: int | None = None  # None -> 8285 for udp, 8472 for vxlan
    vni: int = 1
    proxy_mode: str = "nftables"    # nftables | iptables
    # External IPs for LoadBalancer services, on the underlay. The loader fills in
    # the default (the top 16 usable underlay addresses minus the client's) when the
    # file gives none; an empty list here means "no pool".
    lb_pool: list[IPv4Address] = field(default_factory=list)
    time_scale: float = 1.0         # multiplies controller delays (Job backoff)
    # Added to the contract: the underlay address of the external client namespace.
    # The loader always fills it in (default: the underlay's last usable address).
    client_address: IPv4Address | None = None
    # The node whose namespace the Kubernetes API listens in (127.0.0.1:8080 and
    # its eth0 address); None: the first unschedulable node, else the first node.
    api_server_node: str | None = None
    # Every node uplink's impairment unless the node says otherwise (`cluster.link`).
    link: Impairment = field(default_factory=Impairment)

    def effective_backend_port(self) -> int | None:
        """The backend's UDP port (None for host-gw, which encapsulates nothing)."""
        if self.backend == "host-gw":
            return None
        return self.backend_port if self.backend_port is not None else DEFAULT_BACKEND_PORTS[self.backend]

    def effective_client_address(self) -> IPv4Address:
        if self.client_address is not None:
            return self.client_address
        return self.underlay.broadcast_address - 1

    def subnet_count(self) -> int:
        """How many node subnets of subnet_len the cluster network holds."""
        return 2 ** (self.subnet_len - self.cluster_network.prefixlen)


@dataclass
class NodeSpec:
    name: str                       # DNS-1123 label, max 63 chars
    labels: dict[str, str]          # as written, plus kubernetes.io/hostname and kubernetes.io/os as kubelet adds them
    address: IPv4Address | None     # fixed underlay address, inside settings.underlay
    pod_cidr: IPv4Network | None    # requested pod subnet; inside cluster_network, prefix == subnet_len
    unschedulable: bool = False
    # The uplink's impairment: cluster.link with the node's own `link:` keys
    # over it (None: cluster.link alone).
    link: Impairment | None = None
    # The machine the node runs on (a name in Topology.machines); None: the
    # cluster is on one machine.
    machine: str | None = None

    def uplink(self, settings: "ClusterSettings") -> Impairment:
        # getattr: a cluster saved before links had properties has no settings.link.
        return self.link if self.link is not None else getattr(settings, "link", Impairment())


@dataclass
class MachineSpec:
    """One machine of a cluster over several (`machines:`): the first runs the
    control plane (`netemu up`), the others `netemu join`."""
    name: str                       # DNS-1123 label
    address: IPv4Address            # where the other machines reach it (its tunnel's end)


@dataclass
class Topology:
    name: str                       # cluster name: lowercase DNS label, 1..20 chars
    source: Path | None             # the topology file (None: given as a dict, see load_topology_dict)
    settings: ClusterSettings
    nodes: list[NodeSpec]
    objects: list[dict]             # Kubernetes objects in API shape, in file order
    warnings: list[str]
    # The machines the cluster spans (`machines:`); empty: this machine alone.
    machines: list[MachineSpec] = field(default_factory=list)

    def machine(self, name: str) -> MachineSpec:
        for m in self.machines:
            if m.name == name:
                return m
        raise KeyError(name)

    def nodes_on(self, machine: str | None) -> list[NodeSpec]:
        """The nodes that run on MACHINE (None, or a cluster on one machine: all)."""
        if machine is None or not self.machines:
            return list(self.nodes)
        return [n for n in self.nodes if n.machine == machine]

    def master_node(self) -> str:
        """The node the API server listens in: cluster.apiServerNode, else the
        first unschedulable node (the tutorial's master), else the first node."""
        if self.settings.api_server_node:
            return self.settings.api_server_node
        return next((n.name for n in self.nodes if n.unschedulable), self.nodes[0].name)

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def underlay_addresses(self) -> dict[str, IPv4Address]:
        """Every node's underlay address: fixed ones as written, the others taken
        from the lowest free usable addresses (skipping the client and the LB pool).

        The loader has already checked that the underlay is large enough, so this
        never runs out.
        """
        taken = {n.address for n in self.nodes if n.address is not None}
        taken.add(self.settings.effective_client_address())
        taken.update(self.settings.lb_pool)
        free = (a for a in self.settings.underlay.hosts() if a not in taken)
        return {n.name: n.address if n.address is not None else next(free) for n in self.nodes}
