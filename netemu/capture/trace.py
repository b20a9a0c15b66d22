"""`netemu trace`: one probe, seen at every hop of its path and of its reply.

How a trace runs:
1. plan: from the store (pods' nodes, nodes' addresses, the overlay backend,
   services and their endpoints) work out the capture points the probe crosses:
   the source pod's eth0, its veth on the node, the node's docker0, the tunnel
   device (flannel0 or flannel.1) and the node's eth0 when it crosses nodes, then
   the same on the far side down to the destination pod's eth0. A Service's
   endpoint is picked at random by the kernel, so every endpoint's path is
   captured and the one the probe took is chosen afterwards.
2. capture: a tcpdump on every point, all listening before anything is sent.
3. probe: ONE probe from the source's namespace (a TCP connect, a UDP datagram, an
   ICMP echo), each carrying something that survives NAT and encapsulation: the
   TCP initial sequence number, or a random token in the payload.
4. correlate: find the probe and its reply in each pcap (by that mark, whatever
   NAT did to addresses and ports) and print them hop by hop, with the headers as
   they were at each hop, so that DNAT, masquerade, encapsulation and TTL show.

Steps 1 and 4 are pure (plan_*, classify, assign, annotate, format_trace) and
tested without root; steps 2 and 3 touch namespaces (run_trace).

Over several machines a trace captures on the machine it runs on: the hops of
another machine's nodes and pods are in the path (said to be elsewhere) but not
captured. Where the path crosses to another machine it gains the machine
tunnel's two hops (place): the fabric's port to that machine (m-<machine>, the
frame as the fabric carries it) and this machine's own link towards it (the
same frame in a VXLAN datagram between the machines, UDP 4789, the pair's VNI),
captured read-only in the machine's own namespace, filtered to that tunnel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import random
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

from netemu import names
from netemu.k8s import kinds
from netemu.capture.targets import ClusterView, PodInfo, ServiceInfo, ServicePortInfo

PROBE_TIMEOUT = 2.0     # seconds to wait for the reply
TOKEN_PREFIX = b"netemu-trace:"


class TraceError(ValueError):
    pass


# --- the path -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Point:
    """One place tcpdump listens: an interface in a namespace (None: this
    machine's own), with a capture filter of its own when it has one."""

    netns: str | None
    iface: str
    bpf: str | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    """One hop of the planned path: a capture point, and what the probe should look
    like there (encapsulated on the underlay between nodes, plain elsewhere)."""

    point: Point
    where: str            # "pod web1", "node node1", "client", "fabric", "machine a"
    encapsulated: bool = False
    note: str = ""        # said when the probe is not seen there
    elsewhere: str | None = None   # the other machine it is on: not captured from here

    @property
    def label(self) -> str:
        return f"{self.where} {self.point.iface}"

    @property
    def key(self) -> tuple[Point, bool]:
        return (self.point, self.encapsulated)


BRIDGED_NOTE = ("not seen: the bridge forwards between its ports without passing "
                "the packet up to docker0")
# A pod reaching a Service (or its node's NodePort) whose endpoint is on the same
# node: the frame is addressed to docker0 (the gateway), but br_netfilter runs the
# nat PREROUTING hook inside the bridge, the DNAT makes the endpoint the
# destination, and the bridge forwards the frame straight to the endpoint's port
# (kubernetes/kubernetes#38802 is what happens without br_netfilter). docker0
# sees the frame only when the node has no resolved ARP entry for the endpoint:
# br_netfilter then hands it to the neighbour code, which sends it out through
# the bridge device (br_nf_pre_routing_finish_bridge; `bridged_dnat`).
DNAT_BRIDGED_NOTE = ("not seen: DNAT happened inside the bridge (br_netfilter), which then "
                     "forwarded the frame straight to the endpoint's port")


def _pod_steps(pod: PodInfo, view: ClusterView) -> list[Step]:
    """A pod's eth0 and the node side of its veth, from the pod outwards."""
    node = view.nodes.get(pod.node or "")
    if node is None:
        raise TraceError(f"pod {pod.key} is not on a known node")
    steps = [Step(Point(pod.netns, names.POD_IFACE), f"pod {pod.key}")]
    if pod.veth:
        steps.append(Step(Point(node.netns, pod.veth), f"node {node.name}"))
    return steps


def _bridge(view: ClusterView, node: str, note: str = "") -> Step:
    return Step(Point(view.nodes[node].netns, names.NODE_BRIDGE), f"node {node}", note=note)


def _uplink(view: ClusterView, node: str, encapsulated: bool = False) -> Step:
    return Step(Point(view.nodes[node].netns, names.NODE_UPLINK), f"node {node}", encapsulated=encapsulated)


def _between_nodes(view: ClusterView, a: str, b: str) -> list[Step]:
    """From node A's IP stack to node B's: tunnel device, eth0, eth0, tunnel."""
    na, nb = view.nodes[a], view.nodes[b]
    tunnel = view.tunnel_device
    encap = tunnel is not None
    steps = []
    if tunnel:
        steps.append(Step(Point(na.netns, tunnel), f"node {a}"))
    steps.append(_uplink(view, a, encap))
    steps.append(_uplink(view, b, encap))
    if tunnel:
        steps.append(Step(Point(nb.netns, tunnel), f"node {b}"))
    return steps


def _node_to_pod(view: ClusterView, node: str, pod: PodInfo, bridge_note: str = "") -> list[Step]:
    """From NODE's IP stack down to POD's eth0 (crossing nodes if the pod is elsewhere)."""
    steps = []
    if pod.node != node:
        steps += _between_nodes(view, node, pod.node)
        bridge_note = ""
    steps.append(_bridge(view, pod.node, bridge_note))
    return steps + list(reversed(_pod_steps(pod, view)))


def _merge(steps: Iterable[Step]) -> list[Step]:
    """Drop a step that repeats the one just before it (a leg ending where the next
    begins), keeping the first one's note unless only the second has one."""
    out: list[Step] = []
    for s in steps:
        if out and out[-1].key == s.key:
            if not out[-1].note and s.note:
                out[-1] = s
            continue
        out.append(s)
    return out


def _machines_of_namespaces(view: ClusterView) -> dict[str, str]:
    """The machine each of the cluster's namespaces lives on (over several)."""
    out = {n.netns: n.machine for n in view.nodes.values() if n.machine}
    out.update({p.netns: view.nodes[p.node].machine for p in view.pods.values()
                if p.node in view.nodes and view.nodes[p.node].machine})
    for ns in (view.client_ns, view.lb_ns, names.lb_ns(view.name)):
        if ns and view.first_machine:
            out[ns] = view.first_machine
    return out


def _machine_tunnel(view: ClusterView, a: str, b: str, encapsulated: bool) -> list[Step]:
    """The hops of the fabric's frame from machine A to machine B, as this
    machine sees them: out through the fabric's port to B, then in VXLAN on this
    machine's link (when A is here), or the reverse (when B is here). A crossing
    between two other machines is not seen here at all."""
    if view.here not in (a, b):
        return []
    peer = view.machines[b if a == view.here else a]
    port = Step(Point(view.fabric_ns, peer.port), "fabric", encapsulated)
    link = Step(Point(None, peer.link or "?", peer.outer_filter), f"machine {view.here}", encapsulated)
    return [port, link] if a == view.here else [link, port]


def place(view: ClusterView, steps: Sequence[Step]) -> list[Step]:
    """STEPS on the machines of a cluster over several: the steps of another
    machine marked as such, and the machine tunnel's hops where the path goes
    from one machine to another. A cluster on one machine: STEPS unchanged."""
    if view.here is None:
        return list(steps)
    where = _machines_of_namespaces(view)
    out: list[Step] = []
    last = None
    for s in steps:
        machine = where.get(s.point.netns, view.here) if s.point.netns is not None else view.here
        if last is not None and machine != last:
            out += _machine_tunnel(view, last, machine, s.encapsulated)
        out.append(dataclasses.replace(s, elsewhere=machine if machine != view.here else None))
        last = machine
    return out


def plan_pod_to_pod(view: ClusterView, src: PodInfo, dst: PodInfo, dnat: bool = False) -> list[Step]:
    """The hops of a packet from pod SRC to pod DST. DNAT says it was sent to a
    service address and rewritten on SRC's node (in the bridge, when DST is there too)."""
    out = _pod_steps(src, view)
    note = DNAT_BRIDGED_NOTE if dnat else BRIDGED_NOTE
    out.append(_bridge(view, src.node, note if src.node == dst.node else ""))
    out += _node_to_pod(view, src.node, dst, note)
    return _merge(out)


def plan_client_to_pod(view: ClusterView, node: str, dst: PodInfo) -> list[Step]:
    """The external client to a NodePort on NODE, forwarded to pod DST."""
    out = [Step(Point(view.client_ns, "eth0"), "client"), _uplink(view, node)]
    return _merge(out + _node_to_pod(view, node, dst))


def plan_client_via_lb(view: ClusterView, node: str, dst: PodInfo) -> list[Step]:
    """The external client to a LoadBalancer's external IP: into the balancer's
    eth0, out of the same eth0 to NODE's NodePort (DNAT + masquerade there), then
    as a NodePort packet on to pod DST."""
    if view.lb_ns is None:
        raise TraceError(f'cluster "{view.name}" has no load balancer namespace')
    lb = Point(view.lb_ns, names.NODE_UPLINK)
    # Not merged: the balancer's eth0 sees the probe twice, in and out.
    return [Step(Point(view.client_ns, "eth0"), "client"), Step(lb, "lb"), Step(lb, "lb"),
            *_merge([_uplink(view, node)] + _node_to_pod(view, node, dst))]


def plan_pod_to_node(view: ClusterView, src: PodInfo, node: str, dst: PodInfo) -> list[Step]:
    """Pod SRC to NODE's own address (a NodePort), forwarded to pod DST: routed out
    of SRC's node plainly, no tunnel, when NODE is another node; DNATed on SRC's
    node when NODE is its own."""
    out = _pod_steps(src, view)
    if node == src.node:
        note = DNAT_BRIDGED_NOTE if dst.node == node else ""
        return _merge(out + [_bridge(view, node, note)] + _node_to_pod(view, node, dst, note))
    out += [_bridge(view, src.node), _uplink(view, src.node), _uplink(view, node)]
    return _merge(out + _node_to_pod(view, node, dst))


def plan_pod_to_node_reply(view: ClusterView, src: PodInfo, node: str, dst: PodInfo) -> list[Step]:
    """The reply to plan_pod_to_node's probe when NODE is another node. The probe
    went there plainly (a node's address is on the underlay) and was DNATed and
    masqueraded by NODE, so the reply goes back to NODE first; conntrack there
    gives it SRC's pod address as destination, and a pod address is reached
    through the overlay: the reply comes home through the tunnel, not the way
    the probe went."""
    back_to_node = list(reversed(_node_to_pod(view, node, dst)))
    return _merge(back_to_node + _node_to_pod(view, node, src))


def plan_pod_to_external(view: ClusterView, src: PodInfo, address: str) -> list[Step]:
    """Pod SRC to an address outside the cluster: out of its node's eth0
    (masqueraded), into the client's eth0 when it is the client's address."""
    out = _pod_steps(src, view) + [_bridge(view, src.node), _uplink(view, src.node)]
    if view.client_address == address:
        out.append(Step(Point(view.client_ns, "eth0"), "client"))
    return out


# --- the destination ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Destination:
    kind: str                          # "pod", "service", "nodeport", "loadbalancer", "external"
    address: str                       # where the probe is sent
    port: int | None
    proto: str                         # "tcp", "udp", "icmp"
    description: str
    service: ServiceInfo | None = None
    service_port: ServicePortInfo | None = None
    node: str | None = None            # the node addressed (nodeport)
    candidates: tuple[PodInfo, ...] = ()   # pods the probe may end at


def _service_port(svc: ServiceInfo, port: int | None, proto: str, node_port: int | None = None) -> ServicePortInfo:
    for sp in svc.ports:
        if sp.protocol.lower() != proto:
            continue
        if node_port is not None and sp.node_port == node_port:
            return sp
        if node_port is None and (port is None or sp.port == port):
            return sp
    want = f"nodePort {node_port}" if node_port else f"port {port}" if port else "a port"
    raise TraceError(f"service {svc.key} has no {proto.upper()} {want}")


def _service_dest(view: ClusterView, svc: ServiceInfo, port: int | None, proto: str,
                  address: str | None = None) -> Destination:
    """The service's ClusterIP, or ADDRESS when it is one of its external IPs."""
    if not svc.cluster_ip:
        raise TraceError(f"service {svc.key} has no ClusterIP (headless): trace a pod instead")
    sp = _service_port(svc, port, proto)
    pods = tuple(p for p in (view.pod_by_ip(e.ip) for e in sp.endpoints) if p is not None)
    if address and address in svc.load_balancer_ips:
        return Destination("loadbalancer", address, sp.port, proto,
                           f"external IP {address}:{sp.port} of service {svc.key}", svc, sp, candidates=pods)
    return Destination("service", svc.cluster_ip, sp.port, proto,
                       f"service {svc.key} {svc.cluster_ip}:{sp.port}", svc, sp, candidates=pods)


def _nodeport_dest(view: ClusterView, node: str, node_port: int, proto: str) -> Destination:
    for svc in view.services.values():
        for sp in svc.ports:
            if sp.node_port == node_port and sp.protocol.lower() == proto:
                pods = tuple(p for p in (view.pod_by_ip(e.ip) for e in sp.endpoints) if p is not None)
                address = view.nodes[node].address
                return Destination("nodeport", address, node_port, proto,
                                   f"NodePort {node}:{node_port} of service {svc.key}", svc, sp,
                                   node=node, candidates=pods)
    raise TraceError(f"no service has {proto.upper()} nodePort {node_port}")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False


POD_WORDS = ("",) + kinds.BY_KIND["Pod"].words
SERVICE_WORDS = ("",) + kinds.BY_KIND["Service"].words
KIND_WORDS = POD_WORDS[1:] + SERVICE_WORDS[1:]


def split_source(src: str, namespace: str) -> tuple[str, str]:
    """(namespace, pod name) of a trace's source: NAME, pod/NAME, NAMESPACE/NAME
    or pod/NAMESPACE/NAME."""
    if src.startswith(tuple(w + "/" for w in POD_WORDS[1:])):
        src = src.split("/", 1)[1]
    if "/" in src:
        namespace, _, src = src.partition("/")
    return namespace, src


def resolve_destination(view: ClusterView, dest: str, port: int | None, proto: str,
                        namespace: str = "default") -> Destination:
    """What DEST names: pod/NAME or NAME (a pod, then a service), svc/NAME, an IP
    (a pod's, a ClusterIP, a node's with --port a NodePort, or outside), NODE:PORT.
    A name may carry its namespace, as NAMESPACE/NAME or KIND/NAMESPACE/NAME."""
    proto = proto.lower()
    if proto not in ("tcp", "udp", "icmp"):
        raise TraceError(f"unknown protocol {proto} (tcp, udp or icmp)")
    kind, _, name = dest.partition("/") if "/" in dest and not _is_ip(dest.split("/")[0]) else ("", "", dest)
    if kind and kind not in KIND_WORDS:
        # Not a kind: NAMESPACE/NAME (a pod, then a service, of that namespace).
        namespace, kind, name = kind, "", name
    if "/" in name:
        # KIND/NAMESPACE/NAME
        namespace, _, name = name.partition("/")
    host, sep, after = name.rpartition(":")
    if not kind and sep and after.isdigit() and host:
        node = host if host in view.nodes else getattr(view.node_by_address(host), "name", None)
        if node is None:
            raise TraceError(f'"{host}" is not a node name or address')
        return _nodeport_dest(view, node, int(after), proto)
    if kind in POD_WORDS:
        pod = view.pod(name, namespace)
        if pod is None and _is_ip(name):
            pod = view.pod_by_ip(name)
        if pod is not None:
            if not pod.ip:
                raise TraceError(f"pod {pod.key} has no IP yet")
            if proto != "icmp" and port is None:
                raise TraceError(f"say which port of pod {pod.key} to probe: --port N")
            return Destination("pod", pod.ip, port, proto, f"pod {pod.key} {pod.ip}", candidates=(pod,))
        if kind:
            raise TraceError(f'pods "{name}" not found')
    if kind in SERVICE_WORDS:
        svc = view.services.get(f"{namespace}/{name}")
        if svc is None and _is_ip(name):
            svc = view.service_by_ip(name)
        if svc is not None:
            if proto == "icmp":
                raise TraceError("a service answers TCP and UDP only (kube-proxy does not DNAT ICMP)")
            return _service_dest(view, svc, port, proto, name if _is_ip(name) else None)
        if kind:
            raise TraceError(f'services "{name}" not found')
    if kind:
        raise TraceError(f'unknown destination kind "{kind}" (pod/, svc/)')
    if _is_ip(name):
        node = view.node_by_address(name)
        if node is not None and port is not None and proto != "icmp":
            with contextlib.suppress(TraceError):
                return _nodeport_dest(view, node.name, port, proto)
        if proto != "icmp" and port is None:
            raise TraceError(f"say which port of {name} to probe: --port N")
        return Destination("external", name, port, proto, f"{name} (outside the cluster)")
    raise TraceError(f'"{dest}" is not a pod, service, IP address or NODE:PORT')


@dataclasses.dataclass(frozen=True)
class Route:
    """One way the probe may go. A Service's endpoint (and a load balancer's node)
    is chosen at random by the kernel, so a trace plans every route, captures on
    all of their points, and afterwards keeps the one the probe took."""

    steps: tuple[Step, ...]
    endpoint: PodInfo | None = None     # the pod at the end (None: outside the cluster)
    dnat_node: str | None = None        # the node whose kube-proxy rules DNAT the probe
    lb_node: str | None = None          # the node the load balancer forwards to
    reply: tuple[Step, ...] | None = None   # the reply's hops when it goes another way back

    @property
    def reply_steps(self) -> tuple[Step, ...]:
        return self.reply if self.reply is not None else tuple(reversed(self.steps))


def plan(view: ClusterView, src: str, dest: Destination, namespace: str = "default") -> tuple[str, dict[str, Route]]:
    """The source namespace and the possible routes, keyed by endpoint pod (and,
    through a load balancer, the node it picked: "n1/b"), or "" for no pod.
    Over several machines, each route placed on them (see place)."""
    src_ns, routes = _plan(view, src, dest, namespace)
    return src_ns, {k: dataclasses.replace(r, steps=tuple(place(view, r.steps)),
                                           reply=tuple(place(view, r.reply)) if r.reply is not None else None)
                    for k, r in routes.items()}


def _plan(view: ClusterView, src: str, dest: Destination, namespace: str) -> tuple[str, dict[str, Route]]:
    if src == "client":
        if view.here is not None and view.here != view.first_machine:
            raise TraceError(f"the external client runs on machine {view.first_machine} "
                             f"(this is {view.here}): trace from there")
        if dest.kind == "nodeport":
            return view.client_ns, {p.key: Route(tuple(plan_client_to_pod(view, dest.node, p)), p, dest.node)
                                    for p in dest.candidates}
        if dest.kind == "loadbalancer":
            return view.client_ns, {f"{n}/{p.key}": Route(tuple(plan_client_via_lb(view, n, p)), p, n, n)
                                    for n in sorted(view.nodes) for p in dest.candidates}
        raise TraceError("from the client, trace a NodePort (NODE:PORT) or a LoadBalancer's external "
                         "IP: pod and service addresses are not routed outside the cluster")
    pod = view.pod(*reversed(split_source(src, namespace)))
    if pod is None or not pod.ip:
        raise TraceError(f'source "{src}" is not a running pod (or "client")')
    if (other := view.elsewhere(pod.node)) is not None:
        raise TraceError(f"pod {pod.key} runs on node {pod.node}, on machine {other} "
                         f"(this is {view.here}): trace from there")
    if dest.kind == "pod":
        target = dest.candidates[0]
        return pod.netns, {target.key: Route(tuple(plan_pod_to_pod(view, pod, target)), target)}
    if dest.kind in ("service", "loadbalancer"):
        # kube-proxy puts external IPs in the same map as ClusterIPs: from inside the
        # cluster the packet never goes to the balancer, the pod's node DNATs it.
        return pod.netns, {p.key: Route(tuple(plan_pod_to_pod(view, pod, p, dnat=True)), p, pod.node)
                           for p in dest.candidates}
    if dest.kind == "nodeport":
        return pod.netns, {p.key: Route(tuple(plan_pod_to_node(view, pod, dest.node, p)), p, dest.node,
                                        reply=(tuple(plan_pod_to_node_reply(view, pod, dest.node, p))
                                               if dest.node != pod.node else None))
                           for p in dest.candidates}
    return pod.netns, {"": Route(tuple(plan_pod_to_external(view, pod, dest.address)))}


def capture_points(routes: dict[str, Route]) -> list[Point]:
    """Where to capture: every step's point on this machine."""
    seen: dict[Point, None] = {}
    for route in routes.values():
        for s in route.steps + route.reply_steps:
            if s.elsewhere is None:
                seen.setdefault(s.point)
    return list(seen)


# --- what each capture saw ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Seen:
    """One packet at one capture point, as needed to follow the probe."""

    time: float
    inner: object                   # decode.IPHeader: the pod-level packet
    outer: object | None = None     # decode.IPHeader of the encapsulating datagram
    encapsulation: str | None = None
    vni: int | None = None
    ip_id: int | None = None
    tcp_seq: int | None = None
    tcp_ack: int | None = None
    icmp_type: int | None = None
    has_token: bool = False
    carrier: object | None = None   # decode.IPHeader: the machine tunnel's datagram
    carrier_vni: int | None = None


def seen_from_packet(pkt, token: bytes | None) -> Seen | None:
    """A Seen from a scapy packet (None for ARP, IPv6 and undecodable packets)."""
    from scapy.layers.inet import ICMP, IP, TCP
    from netemu.capture import decode

    d = decode.decode_packet(pkt)
    if d.kind != "ipv4" or d.inner is None:
        return None
    inner_ip = None
    layer = pkt
    while layer is not None and layer.__class__.__name__ != "NoPayload":
        if type(layer) is IP:       # not IPerror, the copy quoted by an ICMP error
            inner_ip = layer
        layer = layer.payload
    fields: dict = {}
    if inner_ip is not None:
        fields["ip_id"] = inner_ip.id
        l4 = inner_ip.payload
        if type(l4) is TCP:
            fields.update(tcp_seq=l4.seq, tcp_ack=l4.ack)
        elif type(l4) is ICMP:
            fields["icmp_type"] = l4.type
    return Seen(time=d.time, inner=d.inner, outer=d.outer, encapsulation=d.encapsulation, vni=d.vni,
                has_token=bool(token) and token in bytes(pkt), carrier=d.carrier, carrier_vni=d.carrier_vni,
                **fields)


def read_seen(pcap_path: str, token: bytes | None) -> list[Seen]:
    from netemu.capture import decode
    out = []
    for pkt in decode.read_pcap(pcap_path):
        s = seen_from_packet(pkt, token)
        if s is not None:
            out.append(s)
    return out


@dataclasses.dataclass(frozen=True)
class ProbeMark:
    """What identifies the probe and its reply whatever NAT does to them."""

    proto: str                # "tcp", "udp", "icmp"
    isn: int | None = None    # TCP: the SYN's sequence number
    token: bytes | None = None  # UDP/ICMP: in the payload (ICMP errors quote it)


def classify(s: Seen, mark: ProbeMark) -> str | None:
    """"forward" (the probe), "reply" (its answer) or None (other traffic)."""
    h = s.inner
    if mark.proto == "tcp":
        if h.proto != "TCP" or mark.isn is None:
            return None
        if "S" in h.flags and "." not in h.flags and s.tcp_seq == mark.isn:
            return "forward"
        if ("S" in h.flags or "R" in h.flags) and "." in h.flags and s.tcp_ack == (mark.isn + 1) % 2**32:
            return "reply"
        return None
    if not s.has_token:
        return None
    if h.proto == "ICMP":
        if s.icmp_type == 8:
            return "forward" if mark.proto == "icmp" else None
        return "reply"          # echo reply, or an error quoting the probe
    if h.proto == "UDP" and mark.proto == "udp":
        return "forward"        # an echoed reply is told apart by its ports: see split_udp
    return None


def split(seen: Sequence[Seen], mark: ProbeMark) -> tuple[list[Seen], list[Seen]]:
    """The probe's and the reply's packets among those seen at one point, by time.

    A UDP reply that echoes the token looks like the probe: it is the one whose
    destination is the probe's source at this point."""
    fwd, rep = [], []
    for s in sorted(seen, key=lambda s: s.time):
        kind = classify(s, mark)
        if kind == "forward" and mark.proto == "udp" and fwd:
            first = fwd[0].inner
            if (s.inner.dst, s.inner.dport) == (first.src, first.sport):
                kind = "reply"
        if kind == "forward":
            fwd.append(s)
        elif kind == "reply":
            rep.append(s)
    return fwd, rep


@dataclasses.dataclass
class Hop:
    step: Step
    seen: list[Seen]


def assign(steps: Sequence[Step], packets: dict[Point, list[Seen]]) -> list[Hop]:
    """Give each step the packets of its point, in time order.

    A point can occur twice on one path (a NodePort's node eth0 takes the packet in
    plain and sends it on encapsulated; docker0 may see it in and out after DNAT):
    packets go to the steps that expect their form (encapsulated or not), the k-th
    packet to the k-th such step, any surplus (retransmissions) to the last one."""
    by_key: dict[tuple, list[int]] = {}
    for i, s in enumerate(steps):
        by_key.setdefault(s.key, []).append(i)
    hops = [Hop(s, []) for s in steps]
    for point, seen in packets.items():
        for encapsulated in (False, True):
            idx = by_key.get((point, encapsulated), [])
            if not idx:
                continue
            matching = [s for s in sorted(seen, key=lambda s: s.time)
                        if (s.encapsulation is not None) == encapsulated]
            for k, s in enumerate(matching):
                hops[idx[min(k, len(idx) - 1)]].seen.append(s)
    return hops


def hops_seen(hops: Sequence[Hop]) -> int:
    return sum(1 for h in hops if h.seen)


def choose_path(routes: dict[str, Route], forward: dict[Point, list[Seen]]) -> str:
    """The route the probe actually took: the one whose last hop (the endpoint pod)
    saw it; among those (or if none did), the one with most hops seen and fewest
    not seen (through a load balancer, every node's route ends at the same pod).
    Hops on another machine are not captured and count for nothing; a route whose
    end is there is told from another by where the last hop seen here sent the
    probe (the endpoint's address, after DNAT)."""
    def score(item):
        route = item[1]
        hops = [h for h in assign(route.steps, forward) if h.step.elsewhere is None]
        seen = hops_seen(hops)
        last = next((h.seen[0].inner for h in reversed(hops) if h.seen), None)
        to_endpoint = bool(route.endpoint and last is not None and last.dst == route.endpoint.ip)
        ends_here = bool(hops) and hops[-1].step is route.steps[-1]
        return (ends_here and bool(hops[-1].seen), to_endpoint, seen - (len(hops) - seen))
    return max(routes.items(), key=score)[0]


# --- describing what changed between hops --------------------------------------

def _ep(addr: str, port: int | None) -> str:
    return addr if port is None else f"{addr}:{port}"


def address_names(view: ClusterView) -> dict[str, str]:
    """Who owns each address a trace may show, to say whose address NAT put in
    ("10.244.1.0" -> "node n1 flannel0"): pods, nodes' eth0, tunnel and docker0
    addresses, ClusterIPs, external IPs, the client and the load balancer."""
    out: dict[str, str] = {}
    for node in view.nodes.values():
        if node.subnet and view.tunnel_device:
            # flannel gives its device the subnet's network address (udp: with the
            # whole network's prefix; vxlan: /32); masquerade out of it uses it.
            out[str(ipaddress.IPv4Network(node.subnet, strict=False).network_address)] = \
                f"node {node.name} {view.tunnel_device}"
        if node.bridge_ip:
            out[node.bridge_ip] = f"node {node.name} {names.NODE_BRIDGE}"
        out[node.address] = f"node {node.name} {names.NODE_UPLINK}"
    for svc in view.services.values():
        if svc.cluster_ip:
            out[svc.cluster_ip] = f"ClusterIP of {svc.key}"
        for ip in svc.load_balancer_ips:
            out[ip] = f"external IP of {svc.key}"
    if view.lb_address:
        # The balancer's masquerade uses its eth0's first address, an external IP.
        out[view.lb_address] = "load balancer"
    if view.client_address:
        out[view.client_address] = "client"
    if view.here_address:
        out[view.here_address] = f"machine {view.here}"
    for m in view.machines.values():
        out[m.address] = f"machine {m.name}"
    for pod in view.pods.values():
        if pod.ip:
            out[pod.ip] = f"pod {pod.key}"
    return out


def changes(prev: Seen | None, cur: Seen, reply: bool = False, owners: dict[str, str] | None = None) -> list[str]:
    """What happened to the packet between two hops where it was seen.

    On the way there, a new destination is DNAT and a new source is SNAT
    (masquerade). On the way back conntrack undoes both for the reply: its
    source is restored to what the probe was sent to, its destination to who sent it."""
    notes = []
    if prev is None:
        return notes
    owners = owners or {}

    def to(addr: str, port: int | None) -> str:
        who = owners.get(addr)
        return _ep(addr, port) + (f" ({who})" if who else "")

    a, b = prev.inner, cur.inner
    if (a.dst, a.dport) != (b.dst, b.dport):
        if reply:
            notes.append(f"destination restored {_ep(a.dst, a.dport)} -> {to(b.dst, b.dport)}"
                         " (conntrack undoes the masquerade)")
        else:
            notes.append(f"DNAT {_ep(a.dst, a.dport)} -> {to(b.dst, b.dport)}")
    if (a.src, a.sport) != (b.src, b.sport):
        if reply:
            notes.append(f"source restored {_ep(a.src, a.sport)} -> {to(b.src, b.sport)}"
                         " (conntrack undoes the DNAT)")
        else:
            notes.append(f"SNAT (masquerade) {_ep(a.src, a.sport)} -> {to(b.src, b.sport)}")
    if prev.encapsulation is None and cur.encapsulation is not None:
        o = cur.outer
        tag = "UDP/flannel" if cur.encapsulation == "udp" else f"VXLAN vni {cur.vni}"
        notes.append(f"encapsulated in {tag} {_ep(o.src, o.sport)} > {_ep(o.dst, o.dport)}")
    if prev.encapsulation is not None and cur.encapsulation is None:
        notes.append("decapsulated")
    if prev.carrier is None and cur.carrier is not None:
        c = cur.carrier
        notes.append(f"into the machine tunnel: VXLAN vni {cur.carrier_vni} {_ep(c.src, c.sport)} > "
                     f"{to(c.dst, c.dport)}")
    if prev.carrier is not None and cur.carrier is None:
        notes.append(f"out of the machine tunnel (from {to(prev.carrier.src, None)})")
    if b.ttl < a.ttl:
        notes.append(f"ttl {a.ttl} -> {b.ttl}")
    return notes


def annotate(hops: Sequence[Hop], reply: bool = False, owners: dict[str, str] | None = None) -> list[list[str]]:
    """Per hop, the changes since the last hop where the packet was seen."""
    out, prev = [], None
    for h in hops:
        notes = []
        for s in h.seen[:1]:
            notes = changes(prev, s, reply, owners)
            prev = h.seen[-1]
        out.append(notes)
    return out


# --- the result and its text ----------------------------------------------------

@dataclasses.dataclass
class TraceResult:
    source: str
    destination: Destination
    backend: str
    probe: str                       # e.g. "TCP SYN from 10.244.1.2:40312"
    outcome: str                     # what the probing socket saw
    endpoint: str | None             # the pod the probe ended at (its key)
    forward: list[Hop]
    reply: list[Hop]
    rules: list[str] = dataclasses.field(default_factory=list)   # the NAT rules met, as lines
    pcap_dir: str | None = None      # kept captures, if asked
    owners: dict[str, str] = dataclasses.field(default_factory=dict)   # address -> who has it
    lb_node: str | None = None       # the node a load balancer forwarded the probe to
    answered: bool = False           # the probing socket got the destination's answer

    @property
    def reached(self) -> bool:
        """The last hop saw the probe; or, when that hop is on another machine
        (not captured from here), the destination answered."""
        if not self.forward:
            return False
        last = self.forward[-1]
        return bool(last.seen) or (last.step.elsewhere is not None and self.answered)

    def __str__(self) -> str:
        # What `netemu trace` prints: the Python API hands the result itself over.
        return format_trace(self)


def _describe_seen(s: Seen) -> str:
    h = s.inner
    text = f"{_ep(h.src, h.sport)} > {_ep(h.dst, h.dport)} {h.proto}"
    if h.flags:
        text += f" [{h.flags}]" if h.proto == "TCP" else f" {h.flags}"
    text += f" ttl {h.ttl}"
    if s.outer is not None:
        o = s.outer
        tag = "UDP/flannel" if s.encapsulation == "udp" else f"VXLAN vni {s.vni}"
        text = f"{_ep(o.src, o.sport)} > {_ep(o.dst, o.dport)} {tag} ttl {o.ttl} | " + text
    if s.carrier is not None:
        c = s.carrier
        text = f"{_ep(c.src, c.sport)} > {_ep(c.dst, c.dport)} VXLAN vni {s.carrier_vni} | " + text
    return text


def format_hops(hops: Sequence[Hop], reply: bool = False, owners: dict[str, str] | None = None) -> list[str]:
    width = max((len(h.step.label) for h in hops), default=0)
    lines = []
    for n, (hop, notes) in enumerate(zip(hops, annotate(hops, reply, owners)), 1):
        head = f"  {n:>2}  {hop.step.label:<{width}}  "
        if not hop.seen and hop.step.elsewhere is not None:
            lines.append(head + f"- on machine {hop.step.elsewhere}: not captured from this one")
            continue
        if not hop.seen:
            lines.append(head + f"- {hop.step.note or 'not seen'}")
            continue
        lines.append(head + _describe_seen(hop.seen[0])
                     + (f"  (seen {len(hop.seen)}x)" if len(hop.seen) > 1 else ""))
        for note in notes:
            lines.append(" " * (len(head) + 2) + "^ " + note)
    return lines


def format_trace(r: TraceResult) -> str:
    d = r.destination
    port = f":{d.port}" if d.port else ""
    lines = [f"trace {r.source} -> {d.description} ({d.proto.upper()}{port}), backend {r.backend}",
             f"probe: {r.probe}; {r.outcome}"]
    if r.endpoint and d.kind != "pod":
        via = f"node {r.lb_node} (by the load balancer), then " if r.lb_node else ""
        lines.append(f"endpoint chosen: {via}pod {r.endpoint}")
    if r.rules:
        lines.append("NAT rules that chose it:")
        lines += ["  " + line for line in r.rules]
    lines.append("")
    lines.append(f"forward ({hops_seen(r.forward)}/{len(r.forward)} hops saw the probe):")
    lines += format_hops(r.forward, False, r.owners)
    lines.append("")
    if any(h.seen for h in r.reply):
        lines.append(f"reply ({hops_seen(r.reply)}/{len(r.reply)} hops saw it):")
        lines += format_hops(r.reply, True, r.owners)
    else:
        lines.append("reply: not seen at any hop")
    if r.pcap_dir:
        lines.append(f"\ncaptures kept in {r.pcap_dir}")
    return "\n".join(lines)


# --- NAT rules -------------------------------------------------------------------

def lookup_rules(view: ClusterView, dest: Destination, route: Route, endpoint: str) -> list[str]:
    """The rules that sent the probe to ENDPOINT ("ip:port") along ROUTE, read from
    the namespaces that applied them (netemu.capture.rules), headed by where."""
    from netemu.capture import rules

    out = []
    port = dest.port
    try:
        if route.lb_node is not None and view.lb_ns:
            node_address = view.nodes[route.lb_node].address
            found = rules.lookup_lb(view.lb_ns, dest.address, dest.proto, dest.port, node_address)
            if found:
                out += [f"at the load balancer ({view.lb_ns}), {found[0]}"] + found[1:]
            port = dest.service_port.node_port
        if route.dnat_node is not None and (other := view.elsewhere(route.dnat_node)) is not None:
            out.append(f"(at node {route.dnat_node}, on machine {other}: its rules are read there)")
        elif route.dnat_node is not None:
            vip = dest.address if dest.kind in ("service", "loadbalancer") and route.lb_node is None else None
            found = rules.lookup(view.nodes[route.dnat_node].netns, view.proxy_mode or "nftables",
                                 vip, dest.proto, port, endpoint)
            if found:
                out += [f"at node {route.dnat_node}, {found[0]}"] + found[1:]
    except Exception as e:  # noqa: BLE001 - the rules are an explanation; the trace stands without them
        out.append(f"(could not read the rules: {e})")
    return out


# --- probes (in a namespace) --------------------------------------------------------

def _socket_in(ns: str, *args) -> socket.socket:
    from netemu import netns
    with netns.inside(ns):
        return socket.socket(*args)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


@dataclasses.dataclass
class ProbeResult:
    local: tuple[str, int] | None
    outcome: str
    answered: bool = False      # connected, a UDP answer, an echo reply


def probe_tcp(ns: str, address: str, port: int, timeout: float) -> ProbeResult:
    s = _socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        s.connect_ex((address, port))
        local = s.getsockname()
        _, ready, _ = select.select([], [s], [], timeout)
        if not ready:
            return ProbeResult(local, f"no answer within {timeout:g} s")
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            return ProbeResult(local, "connected", answered=True)
        return ProbeResult(local, f"connect failed: {os.strerror(err)}")
    finally:
        # An RST instead of FIN: nothing lingers in TIME_WAIT in the pod.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def probe_udp(ns: str, address: str, port: int, token: bytes, timeout: float) -> ProbeResult:
    s = _socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((address, port))
        s.send(token)
        local = s.getsockname()
        s.settimeout(timeout)
        try:
            data = s.recv(65535)
            return ProbeResult(local, f"answered with {len(data)} bytes", answered=True)
        except ConnectionRefusedError:
            return ProbeResult(local, "ICMP port unreachable (nothing listens there)")
        except socket.timeout:
            return ProbeResult(local, f"no answer within {timeout:g} s")
    finally:
        s.close()


def probe_icmp(ns: str, address: str, token: bytes, timeout: float) -> ProbeResult:
    s = _socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        ident = random.randrange(1, 0xFFFF)
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        packet = struct.pack("!BBHHH", 8, 0, _icmp_checksum(header + token), ident, 1) + token
        s.sendto(packet, (address, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([s], [], [], left)
            if not ready:
                break
            data, peer = s.recvfrom(65535)
            ihl = (data[0] & 0x0F) * 4
            icmp_type = data[ihl]
            if token in data and icmp_type == 0:
                return ProbeResult(None, f"echo reply from {peer[0]}", answered=True)
            if token in data and icmp_type in (3, 11):
                return ProbeResult(None, f"ICMP error type {icmp_type} from {peer[0]}")
        return ProbeResult(None, f"no answer within {timeout:g} s")
    finally:
        s.close()


# --- running a trace ------------------------------------------------------------------

@contextlib.contextmanager
def capture_all(points: Sequence[Point], workdir: str, bpf_filter: str = "ip") -> Iterator[dict[Point, str]]:
    """tcpdump on every point (started side by side, each listening before the
    block runs); all stopped on leaving, whatever happens. Yields point -> pcap path."""
    from netemu.capture import tcpdump

    caps = {}
    for i, p in enumerate(points):
        path = os.path.join(workdir, f"{i:02d}-{p.netns or 'machine'}-{p.iface}.pcap")
        caps[p] = tcpdump.Capture(ns=p.netns, iface=p.iface, pcap_path=path,
                                  argv=tcpdump.tcpdump_argv(p.iface, path, p.bpf or bpf_filter,
                                                            buffer_kib=4096, promiscuous=False))
    errors: list[BaseException] = []

    def start(c):
        try:
            c.start()
        except BaseException as e:  # noqa: BLE001 - reported below, after all have started
            errors.append(e)

    def side_by_side(fn):
        threads = [threading.Thread(target=fn, args=(c,)) for c in caps.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        side_by_side(start)
        if errors:
            raise TraceError(f"capture failed: {errors[0]}")
        yield {p: c.pcap_path for p, c in caps.items()}
    finally:
        side_by_side(lambda c: c.stop())
        for c in caps.values():   # stop() is idempotent: make sure, in this thread too
            c.stop()


def _register_backend_ports(view: ClusterView) -> None:
    from netemu.capture import decode, targets
    if view.backend == "udp" and view.backend_port:
        decode.register_ports(udp_ports=[view.backend_port])
    elif view.backend == "vxlan" and view.backend_port:
        decode.register_ports(vxlan_ports=[view.backend_port])
    if view.machines:
        decode.register_ports(machine_ports=[targets.MACHINE_PORT])


def run_trace(view: ClusterView, src: str, dest_word: str, *, port: int | None = None, proto: str = "tcp",
              namespace: str = "default", timeout: float = PROBE_TIMEOUT,
              keep_pcaps: str | None = None) -> TraceResult:
    """Plan, capture, probe once, correlate. KEEP_PCAPS: a folder to keep the pcaps in."""
    dest = resolve_destination(view, dest_word, port, proto, namespace)
    if dest.kind in ("service", "nodeport", "loadbalancer") and not dest.candidates:
        raise TraceError(f"{dest.description} has no ready endpoints to trace to")
    src_ns, routes = plan(view, src, dest, namespace)
    _register_backend_ports(view)
    token = TOKEN_PREFIX + os.urandom(8).hex().encode()
    workdir = keep_pcaps or tempfile.mkdtemp(prefix="netemu-trace-")
    os.makedirs(workdir, exist_ok=True)
    try:
        points = capture_points(routes)
        with capture_all(points, workdir) as pcaps:
            if dest.proto == "tcp":
                result = probe_tcp(src_ns, dest.address, dest.port, timeout)
            elif dest.proto == "udp":
                result = probe_udp(src_ns, dest.address, dest.port, token, timeout)
            else:
                result = probe_icmp(src_ns, dest.address, token, timeout)
        seen = {p: read_seen(path, token) for p, path in pcaps.items()}
    finally:
        if keep_pcaps is None:
            shutil.rmtree(workdir, ignore_errors=True)

    first = next(iter(routes.values())).steps[0].point
    mark = ProbeMark(dest.proto, token=token)
    if dest.proto == "tcp":
        mark = ProbeMark("tcp", isn=find_isn(seen, first, result.local))
    forward, reply = {}, {}
    for p, packets in seen.items():
        forward[p], reply[p] = split(packets, mark)
    chosen = choose_path(routes, forward)
    route = routes[chosen]
    steps = route.steps
    fwd_hops = assign(steps, forward)
    rep_hops = assign(list(route.reply_steps), reply)
    probe = {"tcp": "TCP SYN", "udp": "UDP datagram", "icmp": "ICMP echo request"}[dest.proto]
    if result.local:
        probe += f" from {result.local[0]}:{result.local[1]}"
    rules = []
    # The endpoint as the last hop that saw the probe has it: the endpoint pod's
    # eth0, or, when that pod is on another machine, the last hop here.
    last = next((h.seen[0].inner for h in reversed(fwd_hops) if h.seen), None)
    if route.dnat_node is not None and last is not None and (fwd_hops[-1].seen or fwd_hops[-1].step.elsewhere):
        rules = lookup_rules(view, dest, route, _ep(last.dst, last.dport))
    return TraceResult(source=src, destination=dest, backend=view.backend, probe=probe,
                       outcome=result.outcome, endpoint=route.endpoint.key if route.endpoint else None,
                       forward=fwd_hops, reply=rep_hops, rules=rules, pcap_dir=keep_pcaps,
                       owners=address_names(view), lb_node=route.lb_node, answered=result.answered)


def find_isn(seen: dict[Point, list[Seen]], first: Point, local: tuple[str, int] | None) -> int | None:
    """The probe SYN's sequence number, from the capture nearest the source."""
    if local is None:
        return None
    for point in [first] + [p for p in seen if p != first]:
        for s in seen.get(point, []):
            h = s.inner
            if h.proto == "TCP" and h.flags == "S" and (h.src, h.sport) == tuple(local):
                return s.tcp_seq
    return None
