"""Where to capture: a snapshot of a running cluster's layout, and capture targets.

`ClusterView` is what capture, trace and graph need to know about a cluster, read
once from the state store and the per-node/per-pod state files: nodes (underlay
address, namespace, pod subnet), pods (IP, node, namespace, node-side veth),
services (ClusterIP, ports, NodePorts, endpoints), the overlay backend (type, UDP
port, VNI) and the namespaces outside the cluster (the external client, the load
balancer). Building it (`load_view`) reads files; everything that works on it is
pure and tested without root (`view_from_objects` builds one from plain objects).

`resolve_target` turns the word a user types after `netemu capture` into a
namespace and its default interface:
    pod/NAME, NAME (pods first, then nodes), node/NAME, fabric, client, lb,
    machine/NAME (a cluster over several machines: the tunnel to machine NAME,
    at both of its layers, see MachineInfo).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
from collections.abc import Sequence

from netemu import names
from netemu.k8s import kinds

BACKEND_DEVICES = {"udp": "flannel0", "vxlan": "flannel.{vni}", "host-gw": None}
DEFAULT_PORTS = {"udp": 8285, "vxlan": 8472}


class TargetError(ValueError):
    """A capture/trace target that names nothing in the cluster."""


MACHINE_PORT = 4789     # machines.MACHINE_PORT (not imported: that module reads the kernel)


@dataclasses.dataclass(frozen=True)
class MachineInfo:
    """Another machine of a cluster over several, seen from this one: the fabric's
    tunnel to it has two layers. Inside, the fabric's frames cross the bridge port
    PORT (m-<machine>, in the fabric's namespace); outside, each frame travels in a
    VXLAN datagram (VNI, UDP MACHINE_PORT) between this machine's address and
    ADDRESS, on LINK, this machine's own interface towards ADDRESS."""

    name: str
    address: str
    port: str                       # the fabric's bridge port: "m-b"
    vni: int
    link: str | None = None         # this machine's interface towards it (None: no route)

    @property
    def outer_filter(self) -> str:
        """The capture filter for the tunnel's outer datagrams to and from it."""
        return machine_filter(self.address)


def machine_filter(peer: str) -> str:
    """Only the machine tunnel's datagrams to and from PEER (not the machine's
    other traffic): `udp port 4789 and host PEER`."""
    return f"udp port {MACHINE_PORT} and host {peer}"


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str                 # underlay (InternalIP)
    netns: str
    subnet: str | None = None    # pod CIDR leased by the overlay daemon
    bridge_ip: str | None = None  # docker0's address: the subnet's first host
    machine: str | None = None   # the machine it runs on (label netemu.io/machine)


@dataclasses.dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    node: str | None
    ip: str | None
    netns: str
    veth: str | None             # node-side end of the pod's veth pair
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return self.name if self.namespace == "default" else f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True)
class EndpointInfo:
    ip: str
    port: int
    pod: str | None = None       # target pod name (same namespace as the service)
    node: str | None = None


@dataclasses.dataclass(frozen=True)
class ServicePortInfo:
    name: str
    protocol: str                # "TCP", "UDP"
    port: int
    target_port: int | str | None = None
    node_port: int | None = None
    endpoints: tuple[EndpointInfo, ...] = ()


@dataclasses.dataclass(frozen=True)
class ServiceInfo:
    namespace: str
    name: str
    type: str
    cluster_ip: str | None
    ports: tuple[ServicePortInfo, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True)
class ClusterView:
    name: str
    backend: str                          # "udp", "vxlan", "host-gw"
    backend_port: int | None
    vni: int | None
    network: str | None                   # the cluster's pod network (10.244.0.0/16)
    nodes: dict[str, NodeInfo]
    pods: dict[str, PodInfo]              # keyed by PodInfo.key
    services: dict[str, ServiceInfo]      # keyed by "ns/name"
    client_ns: str | None = None
    client_address: str | None = None
    lb_ns: str | None = None
    lb_address: str | None = None
    proxy_mode: str | None = None         # "nftables", "iptables"
    # Over several machines: this machine's name and address, and the others.
    here: str | None = None
    here_address: str | None = None
    machines: dict[str, MachineInfo] = dataclasses.field(default_factory=dict)
    first_machine: str | None = None      # where the client and the load balancer live

    @property
    def fabric_ns(self) -> str:
        return names.fabric_ns(self.name)

    @property
    def tunnel_device(self) -> str | None:
        """The node's overlay device, or None when the backend encapsulates nothing."""
        dev = BACKEND_DEVICES.get(self.backend)
        return dev.format(vni=self.vni if self.vni is not None else 1) if dev else None

    def pod(self, name: str, namespace: str = "default") -> PodInfo | None:
        return self.pods.get(name if namespace == "default" else f"{namespace}/{name}")

    def pod_by_ip(self, ip: str) -> PodInfo | None:
        return next((p for p in self.pods.values() if p.ip == ip), None)

    def node_by_address(self, ip: str) -> NodeInfo | None:
        return next((n for n in self.nodes.values() if n.address == ip), None)

    def node_of_pod_ip(self, ip: str) -> NodeInfo | None:
        """The node whose pod subnet holds IP (from the leases), even if no pod has it."""
        addr = ipaddress.IPv4Address(ip)
        for node in self.nodes.values():
            if node.subnet and addr in ipaddress.IPv4Network(node.subnet, strict=False):
                return node
        return None

    def machine_of_node(self, node: str | None) -> str | None:
        """The machine NODE runs on (None: a cluster on one machine)."""
        info = self.nodes.get(node or "")
        return info.machine if info is not None and self.here is not None else None

    def elsewhere(self, node: str | None) -> str | None:
        """The other machine NODE runs on; None when it runs here (or the
        cluster is on one machine)."""
        machine = self.machine_of_node(node)
        return machine if machine is not None and machine != self.here else None

    def service_by_ip(self, ip: str) -> ServiceInfo | None:
        return next((s for s in self.services.values()
                     if s.cluster_ip == ip or ip in s.load_balancer_ips), None)


# --- building a view from API objects (pure) ---------------------------------

def _internal_ip(node: dict) -> str:
    for a in node.get("status", {}).get("addresses", []):
        if a.get("type") == "InternalIP":
            return a["address"]
    raise TargetError(f"node {node['metadata']['name']} has no InternalIP")


def _endpoints_by_port(ep_obj: dict | None, pods_by_ip: dict[str, PodInfo]) -> dict[tuple, list[EndpointInfo]]:
    """(port name, protocol) -> ready endpoints, from an Endpoints object."""
    out: dict[tuple, list[EndpointInfo]] = {}
    for subset in (ep_obj or {}).get("subsets") or []:
        for port in subset.get("ports") or []:
            key = (port.get("name") or "", port.get("protocol", "TCP"))
            for a in subset.get("addresses") or []:
                pod = pods_by_ip.get(a.get("ip"))
                ref = (a.get("targetRef") or {}).get("name")
                out.setdefault(key, []).append(EndpointInfo(
                    ip=a["ip"], port=int(port["port"]), pod=ref or (pod.name if pod else None),
                    node=a.get("nodeName") or (pod.node if pod else None)))
    return out


def service_info(svc: dict, ep_obj: dict | None, pods_by_ip: dict[str, PodInfo]) -> ServiceInfo:
    spec = svc.get("spec", {})
    eps = _endpoints_by_port(ep_obj, pods_by_ip)
    ports = []
    for p in spec.get("ports") or []:
        proto = p.get("protocol", "TCP")
        ports.append(ServicePortInfo(
            name=p.get("name") or "", protocol=proto, port=int(p["port"]),
            target_port=p.get("targetPort"), node_port=p.get("nodePort"),
            endpoints=tuple(eps.get((p.get("name") or "", proto), ()))))
    ingress = svc.get("status", {}).get("loadBalancer", {}).get("ingress") or []
    cluster_ip = spec.get("clusterIP")
    return ServiceInfo(namespace=svc["metadata"].get("namespace", "default"), name=svc["metadata"]["name"],
                       type=spec.get("type", "ClusterIP"),
                       cluster_ip=cluster_ip if cluster_ip and cluster_ip != "None" else None,
                       ports=tuple(ports),
                       load_balancer_ips=tuple(i["ip"] for i in ingress if i.get("ip")))


def view_from_objects(cluster: str, *, network_config: dict | None, nodes: list[dict], pods: list[dict],
                      services: list[dict] = (), endpoints: list[dict] = (),
                      subnets: dict[str, str] | None = None, veths: dict[str, str] | None = None,
                      client_address: str | None = None, lb_address: str | None = None,
                      lb_exists: bool = False, proxy_mode: str | None = None,
                      here: str | None = None, machines: Sequence[tuple[str, str]] = (),
                      vnis: dict[str, int] | None = None, links: dict[str, str] | None = None) -> ClusterView:
    """A ClusterView from API objects and what the state files say.

    SUBNETS maps node name -> leased pod CIDR; VETHS maps pod key -> node-side veth
    (from the sandbox file; else derived from the pod's uid as the kubelet names it).
    Over several machines: HERE is this machine's name, MACHINES every machine's
    (name, address) in the topology's order, VNIS and LINKS the tunnel's VNI and
    this machine's interface towards each other machine.
    """
    backend_conf = (network_config or {}).get("Backend") or {}
    backend = backend_conf.get("Type", "udp")
    subnets = subnets or {}
    veths = veths or {}
    node_infos = {}
    for n in nodes:
        name = n["metadata"]["name"]
        subnet = subnets.get(name) or n.get("spec", {}).get("podCIDR")
        bridge = str(next(ipaddress.IPv4Network(subnet, strict=False).hosts())) if subnet else None
        machine = (n["metadata"].get("labels") or {}).get(names.MACHINE_LABEL)
        node_infos[name] = NodeInfo(name=name, address=_internal_ip(n), netns=names.node_ns(cluster, name),
                                    subnet=subnet, bridge_ip=bridge, machine=machine)
    pod_infos = {}
    for p in pods:
        meta, status = p["metadata"], p.get("status", {})
        if status.get("phase") in ("Succeeded", "Failed"):
            continue
        ns = meta.get("namespace", "default")
        info = PodInfo(namespace=ns, name=meta["name"], node=p.get("spec", {}).get("nodeName"),
                       ip=status.get("podIP"), netns=names.pod_ns(cluster, ns, meta["name"]), veth=None,
                       labels=tuple(sorted((meta.get("labels") or {}).items())))
        veth = veths.get(info.key) or (names.pod_veth(ns, meta["name"], meta["uid"]) if meta.get("uid") else None)
        pod_infos[info.key] = dataclasses.replace(info, veth=veth)
    by_ip = {p.ip: p for p in pod_infos.values() if p.ip}
    eps = {(e["metadata"].get("namespace", "default"), e["metadata"]["name"]): e for e in endpoints}
    svc_infos = {}
    for s in services:
        key = (s["metadata"].get("namespace", "default"), s["metadata"]["name"])
        info = service_info(s, eps.get(key), by_ip)
        svc_infos[info.key] = info
    return ClusterView(
        name=cluster, backend=backend,
        backend_port=backend_conf.get("Port") or DEFAULT_PORTS.get(backend),
        vni=backend_conf.get("VNI", 1) if backend == "vxlan" else None,
        network=(network_config or {}).get("Network"), nodes=node_infos, pods=pod_infos,
        services=svc_infos, client_ns=names.client_ns(cluster), client_address=client_address,
        lb_ns=names.lb_ns(cluster) if lb_exists else None, lb_address=lb_address, proxy_mode=proxy_mode,
        here=here if machines else None,
        here_address=next((a for m, a in machines if m == here), None),
        machines={m: MachineInfo(name=m, address=a, port=names.machine_port(m), vni=(vnis or {}).get(m, 0),
                                 link=(links or {}).get(m))
                  for m, a in machines if m != here},
        first_machine=machines[0][0] if machines else None)


# --- reading a running cluster ------------------------------------------------

def _ipv4_of(ns: str, iface: str = "eth0") -> str | None:
    """The first IPv4 address on IFACE in namespace NS (`ip -j addr`), or None."""
    proc = subprocess.run(["ip", "-n", ns, "-j", "-4", "addr", "show", "dev", iface],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    for link in json.loads(proc.stdout or "[]"):
        for a in link.get("addr_info", []):
            return a.get("local")
    return None


def _settings(cluster: str, store):
    """The cluster's topology from its ConfigMap (None when it cannot be read:
    the proxy mode is a nicety for rule lookup, and without machines the
    cluster is taken for one on this machine)."""
    try:
        from netemu import clusterconfig
        return clusterconfig.read(cluster, store)
    except Exception:  # noqa: BLE001 - see above
        return None


def _machines(cluster: str, topology) -> dict:
    """view_from_objects' machine arguments for a cluster over several machines,
    reading this machine's routes towards the others (read only)."""
    from netemu import machines as machines_

    here = machines_.name(cluster)
    if topology is None or not topology.machines or here is None:
        return {}
    links = {}
    for peer, _, address, _ in machines_.tunnel_plan(cluster, topology, here):
        try:
            links[peer] = machines_.link_mtu_towards(address)[0]
        except machines_.MachineError:
            pass        # no route: a capture of that tunnel says so
    return {"here": here, "machines": [(m.name, str(m.address)) for m in topology.machines],
            "vnis": {peer: vni for peer, _, _, vni in machines_.tunnel_plan(cluster, topology, here)},
            "links": links}


def load_view(cluster: str, store=None) -> ClusterView:
    """Read the running CLUSTER's layout from its store (objects, leases, the
    sandboxes the kubelets published on their pods, the cluster's settings)
    and the client's and balancer's addresses from the kernel."""
    from netemu import cluster as clusters, netns
    from netemu.node.sandbox import published
    from netemu.overlay import leases
    from netemu.store import registry

    own = store is None
    store = store or clusters.open_store(cluster)
    try:
        kv = store.get(leases.CONFIG_KEY)
        config = kv.value if kv else None
        nodes = registry.list_(store, "Node")
        pods = registry.list_(store, "Pod")
        services = registry.list_(store, "Service")
        endpoints = registry.list_(store, "Endpoints")
        subnets = {lease.node: str(lease.subnet) for lease in leases.read_leases(store) if lease.node}
        topology = _settings(cluster, store)
    finally:
        if own:
            store.close()
    veths = {}
    for p in pods:
        ns, name = p["metadata"].get("namespace", "default"), p["metadata"]["name"]
        sb = published(p)
        if sb is not None:
            veths[name if ns == "default" else f"{ns}/{name}"] = sb.veth
    lb = names.lb_ns(cluster)
    lb_exists = netns.exists(lb)
    return view_from_objects(
        cluster, network_config=config, nodes=nodes, pods=pods, services=services, endpoints=endpoints,
        subnets=subnets, veths=veths, client_address=_ipv4_of(names.client_ns(cluster)),
        lb_address=_ipv4_of(lb) if lb_exists else None, lb_exists=lb_exists,
        proxy_mode=topology.settings.proxy_mode if topology is not None else None,
        **_machines(cluster, topology))


# --- capture targets -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    label: str           # "pod/web1", "node/node1", "fabric", "machine/b", ...
    netns: str
    iface: str           # default interface to capture on
    # machine/NAME only: the tunnel's outer layer, captured in this machine's own
    # namespace (read only) on OUTER_IFACE with OUTER_FILTER.
    outer_iface: str | None = None
    outer_filter: str | None = None


def resolve_target(view: ClusterView, word: str, namespace: str = "default") -> Target:
    """The namespace and default interface WORD names (pods first, then nodes)."""
    kind, _, name = word.partition("/") if "/" in word else ("", "", word)
    if kind in kinds.BY_KIND["Pod"].words:
        kind = "pod"
    elif kind in kinds.BY_KIND["Node"].words:
        kind = "node"
    if kind not in ("", "pod", "node", "machine"):
        raise TargetError(f'unknown capture target kind "{kind}" (use pod/NAME, node/NAME, '
                          "fabric, client, lb or machine/NAME)")
    if kind == "machine":
        return machine_target(view, name)
    if kind == "" and name == "fabric":
        return Target("fabric", view.fabric_ns, names.FABRIC_BRIDGE)
    if kind == "" and name in ("client", "lb"):
        if view.here is not None and view.here != view.first_machine:
            raise TargetError(f"the {'external client' if name == 'client' else 'load balancer'} runs on "
                              f"machine {view.first_machine} (this is {view.here}): capture there")
    if kind == "" and name == "client":
        return Target("client", view.client_ns or names.client_ns(view.name), "eth0")
    if kind == "" and name == "lb":
        if view.lb_ns is None:
            raise TargetError(f'cluster "{view.name}" has no load balancer namespace')
        return Target("lb", view.lb_ns, "eth0")
    if kind in ("", "pod"):
        pod = view.pod(name, namespace)
        if pod is not None:
            _here_or_refuse(view, pod.node, f"pod {pod.key} runs on node {pod.node}, ")
            return Target(f"pod/{pod.key}", pod.netns, names.POD_IFACE)
        if kind == "pod":
            raise TargetError(f'pods "{name}" not found')
    node = view.nodes.get(name)
    if node is not None:
        _here_or_refuse(view, name, f'node "{name}" runs ')
        return Target(f"node/{name}", node.netns, names.NODE_UPLINK)
    raise TargetError(f'no pod or node named "{name}" (nor fabric, client, lb)')


def _here_or_refuse(view: ClusterView, node: str | None, what: str) -> None:
    """A node's (or its pod's) namespaces exist only on the node's machine."""
    other = view.elsewhere(node)
    if other is not None:
        raise TargetError(f"{what}on machine {other} (this is {view.here}): capture there")


def machine_target(view: ClusterView, name: str) -> Target:
    """machine/NAME: the fabric's tunnel to machine NAME, its inner frames on the
    fabric's port m-NAME and its outer VXLAN datagrams on this machine's link."""
    if view.here is None:
        raise TargetError(f'cluster "{view.name}" runs on one machine: it has no machine tunnels')
    if name == view.here:
        raise TargetError(f"machine {name} is this machine: a tunnel goes to another "
                          f"(machines: {', '.join(sorted(view.machines))})")
    peer = view.machines.get(name)
    if peer is None:
        raise TargetError(f'cluster "{view.name}" has no machine "{name}" (machines: '
                          f"{', '.join(sorted([view.here, *view.machines]))})")
    if peer.link is None:
        raise TargetError(f"this machine has no route to machine {name} ({peer.address})")
    return Target(f"machine/{name}", view.fabric_ns, peer.port, outer_iface=peer.link,
                  outer_filter=peer.outer_filter)
