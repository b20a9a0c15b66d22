"""The service proxy's view of the cluster: one record per service port.

kube-proxy never works on Service and Endpoints objects directly: it first
explodes them into "service ports" (pkg/proxy/serviceport.go, endpoints.go),
one per (service, port), each with the endpoints that serve that port. This
module does the same, purely (no kernel, no I/O), from objects in their API
shape, and computes the chain names kube-proxy derives from them:

- iptables mode (pkg/proxy/iptables/proxier.go, portProtoHash): the first 16
  characters of base32(sha256("ns/name:port" + "tcp")), prefixed KUBE-SVC-,
  KUBE-SVL-, KUBE-EXT-, KUBE-FW-; endpoints hash "ns/name:port" + "tcp" +
  "ip:port" and get KUBE-SEP-.
- nftables mode (pkg/proxy/nftables/proxier.go, hashAndTruncate): the readable
  name "ns/name/tcp/port" prefixed with the first 8 characters of the base32
  sha256 of itself, e.g. "service-ULMVA6XW-ns1/svc1/tcp/p80";
  endpoints use "ns/name/tcp/port__ip/port".

The UDP conntrack clean-up that must follow a change (kube-proxy's
conntrack.CleanStaleEntries) is also decided here, as filters and the
entries of a dump they select, so that it can be tested without root.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MASQUERADE_MARK = 0x4000           # kube-proxy's default --masquerade-bit 14
DEFAULT_AFFINITY_TIMEOUT = 10800   # seconds, the API default for ClientIP

# iptables chain name prefixes (pkg/proxy/iptables/proxier.go)
IPT_SVC_PREFIX = "KUBE-SVC-"
IPT_SVL_PREFIX = "KUBE-SVL-"
IPT_EXT_PREFIX = "KUBE-EXT-"
IPT_FW_PREFIX = "KUBE-FW-"
IPT_SEP_PREFIX = "KUBE-SEP-"

# nftables chain/set name prefixes (pkg/proxy/nftables/proxier.go)
NFT_SERVICE_PREFIX = "service-"
NFT_LOCAL_PREFIX = "local-"
NFT_EXTERNAL_PREFIX = "external-"
NFT_ENDPOINT_PREFIX = "endpoint-"
NFT_AFFINITY_PREFIX = "affinity-"
NFT_NAME_MAX = 256                 # knftables.NameLengthMax
NFT_BASE_MAX = NFT_NAME_MAX - 16   # chainNameBaseLengthMax


# Names are asked for many times per sync (10,000 services: ~100,000 times), so
# remember them. kube-proxy uses at most the first 16 characters of the base32
# text, which are exactly the base32 of the first 10 bytes (5 bytes -> 8
# characters). Python's b32encode is pure Python (~9 us for 10 bytes here);
# the 80 bits as one integer, cut into eight 10-bit pairs of base32
# characters, cost a fifth of that.
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]          # 10 bits -> 2 characters
_SHIFTS = (70, 60, 50, 40, 30, 20, 10, 0)


@functools.lru_cache(maxsize=1 << 17)
def _b32_sha256(text: str) -> str:
    """The first 16 characters of base32(sha256(text))."""
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    pairs = _B32_PAIRS
    return "".join([pairs[(n >> s) & 1023] for s in _SHIFTS])


def mark_string(mark: int = MASQUERADE_MARK) -> str:
    """The mark as kube-proxy prints it: Go's %#08x, e.g. 0x004000."""
    return f"{mark:#08x}"


@dataclasses.dataclass(frozen=True, order=True)
class Endpoint:
    """One address serving one service port (an Endpoints address × port)."""

    ip: str
    port: int
    node_name: str | None = None
    ready: bool = True

    @property
    def address(self) -> str:
        """"ip:port", kube-proxy's BaseEndpointInfo.String()."""
        return f"{self.ip}:{self.port}"


@dataclasses.dataclass(frozen=True)
class ServicePort:
    """One port of one Service with the endpoints behind it."""

    namespace: str
    name: str
    port_name: str
    protocol: str                       # "TCP" | "UDP"
    cluster_ip: str
    port: int
    node_port: int = 0                  # 0: none
    load_balancer_ips: tuple[str, ...] = ()   # status.loadBalancer.ingress[].ip
    external_ips: tuple[str, ...] = ()        # spec.externalIPs
    affinity_timeout: int | None = None       # seconds when ClientIP affinity
    external_policy: str = "Cluster"          # externalTrafficPolicy
    endpoints: tuple[Endpoint, ...] = ()

    # -- names -------------------------------------------------------------
    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.name, self.port_name)

    @property
    def name_string(self) -> str:
        """ServicePortName.String(): "ns/name:port", or "ns/name" if unnamed."""
        return service_port_name(self.namespace, self.name, self.port_name)

    @property
    def proto(self) -> str:
        return self.protocol.lower()

    # -- derived facts (pkg/proxy/serviceport.go) ----------------------------
    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.load_balancer_ips or self.external_ips)

    @property
    def external_policy_local(self) -> bool:
        return self.externally_accessible and self.external_policy == "Local"

    @functools.cached_property   # asked several times per sync; the object never changes
    def ready_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(ep for ep in self.endpoints if ep.ready)

    def local_endpoints(self, node_name: str) -> tuple[Endpoint, ...]:
        return tuple(ep for ep in self.ready_endpoints if ep.node_name == node_name)

    def has_external_endpoints(self, node_name: str) -> bool:
        """External traffic arriving at NODE_NAME has somewhere to go: any ready
        endpoint (policy Cluster), or one on this node (policy Local)."""
        if self.external_policy_local:
            return bool(self.local_endpoints(node_name))
        return bool(self.ready_endpoints)

    # -- iptables chain names ----------------------------------------------
    @property
    def ipt_svc_chain(self) -> str:
        return IPT_SVC_PREFIX + port_proto_hash(self.name_string, self.proto)

    @property
    def ipt_svl_chain(self) -> str:
        return IPT_SVL_PREFIX + port_proto_hash(self.name_string, self.proto)

    @property
    def ipt_ext_chain(self) -> str:
        return IPT_EXT_PREFIX + port_proto_hash(self.name_string, self.proto)

    def ipt_sep_chain(self, ep: Endpoint) -> str:
        return iptables_endpoint_chain(self.name_string, self.proto, ep.address)

    # -- nftables chain names ----------------------------------------------
    @functools.cached_property   # three chain names per service port start with it
    def nft_base(self) -> str:
        return nft_service_port_base(self.namespace, self.name, self.proto, self.port_name)

    @property
    def nft_service_chain(self) -> str:
        return NFT_SERVICE_PREFIX + self.nft_base

    @property
    def nft_local_chain(self) -> str:
        return NFT_LOCAL_PREFIX + self.nft_base

    @property
    def nft_external_chain(self) -> str:
        return NFT_EXTERNAL_PREFIX + self.nft_base

    def nft_endpoint_base(self, ep: Endpoint) -> str:
        return nft_endpoint_base(self.namespace, self.name, self.proto, self.port_name,
                                 ep.ip, ep.port)

    def nft_endpoint_chain(self, ep: Endpoint) -> str:
        return NFT_ENDPOINT_PREFIX + self.nft_endpoint_base(ep)

    def nft_affinity_set(self, ep: Endpoint) -> str:
        return NFT_AFFINITY_PREFIX + self.nft_endpoint_base(ep)


# -- chain name algorithms ---------------------------------------------------

def service_port_name(namespace: str, name: str, port_name: str) -> str:
    return f"{namespace}/{name}" + (f":{port_name}" if port_name else "")


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: 16 chars of base32(sha256(name + protocol))."""
    return _b32_sha256(service_port_name + protocol)[:16]


def iptables_endpoint_chain(service_port_name: str, protocol: str, endpoint: str) -> str:
    """kube-proxy's servicePortEndpointChainName: KUBE-SEP- + 16 hash chars."""
    return IPT_SEP_PREFIX + _b32_sha256(service_port_name + protocol + endpoint)[:16]


@functools.lru_cache(maxsize=1 << 17)
def hash_and_truncate(name: str) -> str:
    """nftables mode's hashAndTruncate: 8 hash chars, "-", the readable name."""
    name = _b32_sha256(name)[:8] + "-" + name
    if len(name) > NFT_BASE_MAX:
        name = name[:NFT_BASE_MAX - 3] + "..."
    return name


def nft_service_port_base(namespace: str, name: str, protocol: str, port_name: str) -> str:
    return hash_and_truncate(f"{namespace}/{name}/{protocol}/{port_name}")


def nft_endpoint_base(namespace: str, name: str, protocol: str, port_name: str,
                      ip: str, port: int) -> str:
    return hash_and_truncate(f"{namespace}/{name}/{protocol}/{port_name}__{ip.replace(':', '.')}/{port}")


# -- from API objects --------------------------------------------------------

def _meta_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "default", meta["name"])


def _endpoints_by_port(endpoints_obj: Mapping[str, Any] | None) -> dict[tuple[str, str], list[Endpoint]]:
    """Explode an Endpoints object into {(port name, protocol): [Endpoint]}."""
    result: dict[tuple[str, str], list[Endpoint]] = {}
    if not endpoints_obj:
        return result
    for subset in endpoints_obj.get("subsets") or ():
        for port in subset.get("ports") or ():
            key = (port.get("name") or "", port.get("protocol") or "TCP")
            lst = result.setdefault(key, [])
            for ready, field in ((True, "addresses"), (False, "notReadyAddresses")):
                for addr in subset.get(field) or ():
                    lst.append(Endpoint(addr["ip"], int(port["port"]), addr.get("nodeName"), ready))
    return result


def build_service_ports(services: Iterable[Mapping[str, Any]],
                        endpoints: Iterable[Mapping[str, Any]]) -> list[ServicePort]:
    """Services + Endpoints (API shape, defaulted) -> service ports, sorted by key.

    Headless services (clusterIP None or empty) and ExternalName services are
    skipped, as kube-proxy skips them.
    """
    eps_by_service = {_meta_key(e): e for e in endpoints}
    out: list[ServicePort] = []
    for svc in services:
        spec = svc.get("spec") or {}
        if spec.get("type") == "ExternalName":
            continue
        cluster_ip = spec.get("clusterIP") or ""
        if cluster_ip in ("", "None"):
            continue
        ns, name = _meta_key(svc)
        by_port = _endpoints_by_port(eps_by_service.get((ns, name)))
        lb_ips = tuple(i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()
                       if i.get("ip"))
        if spec.get("type") != "LoadBalancer":
            lb_ips = ()
        affinity = None
        if spec.get("sessionAffinity") == "ClientIP":
            cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
            affinity = int(cfg.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT)
        for port in spec.get("ports") or ():
            pname = port.get("name") or ""
            proto = port.get("protocol") or "TCP"
            node_port = int(port.get("nodePort") or 0) if spec.get("type") in ("NodePort", "LoadBalancer") else 0
            eps = tuple(sorted(set(by_port.get((pname, proto), ()))))
            out.append(ServicePort(
                namespace=ns, name=name, port_name=pname, protocol=proto,
                cluster_ip=cluster_ip, port=int(port["port"]), node_port=node_port,
                load_balancer_ips=lb_ips, external_ips=tuple(spec.get("externalIPs") or ()),
                affinity_timeout=affinity,
                external_policy=spec.get("externalTrafficPolicy") or "Cluster",
                endpoints=eps))
    out.sort(key=lambda sp: sp.key)
    return out


# -- UDP conntrack clean-up ----------------------------------------------------

@dataclasses.dataclass(frozen=True, order=True)
class StaleFlow:
    """UDP conntrack entries to delete: those whose original destination is
    DST:DPORT (DST None: any address, as for a node port) and whose reply comes
    from ENDPOINT; ENDPOINT None: from DST itself, i.e. a flow that was not
    DNATed (rejected while the service had no endpoints). A flow DNATed since
    to a new endpoint is left alone, however late the clean-up runs."""

    dst: str | None
    dport: int
    endpoint: str | None


@dataclasses.dataclass(frozen=True)
class ConntrackEntry:
    """The part of a kernel conntrack entry the clean-up looks at (IPv4)."""

    proto: int                 # IPPROTO_*
    src: str                   # original direction: the client ...
    dst: str                   # ... and the address it sent to (a VIP, a node IP)
    sport: int
    dport: int
    reply_src: str             # who answers: the endpoint after DNAT, else dst
    id: int = 0                # CTA_ID: deleting by tuple and id removes this entry only
    zone: int = 0


IPPROTO_UDP = 17


def stale_udp_flows(old: Sequence[ServicePort], new: Sequence[ServicePort]) -> list[StaleFlow]:
    """The UDP conntrack entries to delete after OLD was replaced by NEW.

    UDP has no connection to close, so a client that keeps sending from one
    socket keeps matching the conntrack entry that was DNATed to an endpoint
    that is now gone (kubernetes#19029, #48370). As kube-proxy does:
    - for each UDP endpoint that was removed, the entries to the cluster IP /
      external IPs / LB IPs / node port whose reply comes from it;
    - for a UDP service port that had no endpoints and now has some, the
      entries to its cluster IP, which recorded the rejected flows;
    - for a UDP service port that vanished (or moved), the entries of its
      endpoints to its old cluster IP.
    Returned as filters, not commands: the caller lists the table once and
    deletes what any filter selects (select_stale), however many there are.
    """
    old_by_key = {sp.key: sp for sp in old}
    flows: set[StaleFlow] = set()
    for sp in new:
        if sp.protocol != "UDP":
            continue
        before = old_by_key.get(sp.key)
        if before is None:
            continue
        if before.cluster_ip != sp.cluster_ip or before.port != sp.port:
            continue  # a different service now; its old VIP entries are handled below
        gone = {ep.ip for ep in before.ready_endpoints} - {ep.ip for ep in sp.ready_endpoints}
        for ip in gone:
            for vip in (sp.cluster_ip, *sp.external_ips, *sp.load_balancer_ips):
                flows.add(StaleFlow(vip, sp.port, ip))
            if sp.node_port:
                flows.add(StaleFlow(None, sp.node_port, ip))
        if not before.ready_endpoints and sp.ready_endpoints:
            flows.add(StaleFlow(sp.cluster_ip, sp.port, None))
    new_keys = {(sp.key, sp.cluster_ip, sp.port) for sp in new}
    for sp in old:
        if sp.protocol == "UDP" and (sp.key, sp.cluster_ip, sp.port) not in new_keys:
            for ep in sp.ready_endpoints:
                flows.add(StaleFlow(sp.cluster_ip, sp.port, ep.ip))
    return sorted(flows, key=lambda f: (f.dst or "", f.dport, f.endpoint or ""))


def select_stale(entries: Iterable[ConntrackEntry], flows: Iterable[StaleFlow]) -> list[ConntrackEntry]:
    """The ENTRIES (one dump of the table) that any of FLOWS selects.

    One pass over the entries with the filters indexed by destination, so
    29 services x 200 removed endpoints cost one lookup per entry, not one
    table scan (or one `conntrack -D` process) per endpoint.
    """
    by_vip: dict[tuple[str, int], set[str | None]] = {}
    by_port: dict[int, set[str | None]] = {}
    for f in flows:
        if f.dst is None:
            by_port.setdefault(f.dport, set()).add(f.endpoint)
        else:
            by_vip.setdefault((f.dst, f.dport), set()).add(f.endpoint)
    out = []
    for e in entries:
        if e.proto != IPPROTO_UDP:
            continue
        # Not DNATed: the reply comes from the address the client sent to.
        sender = None if e.reply_src == e.dst else e.reply_src
        for senders in (by_vip.get((e.dst, e.dport)), by_port.get(e.dport)):
            if senders is not None and sender in senders:
                out.append(e)
                break
    return out
