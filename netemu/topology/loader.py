"""Topology files -> a validated Topology (netemu.topology.model).

A topology file says what cluster to build: its settings, its nodes, and the
Kubernetes objects to create once it is up. It is YAML, camelCase like
Kubernetes, and every key is checked (an unknown key is an error, so a typo is
never silently ignored). Example with every key:

    #!/usr/bin/env -S netemu up        # a shebang line is a YAML comment: allowed
    name: tutorial                     # cluster name, [a-z0-9]([-a-z0-9]*[a-z0-9])?,
                                       # 1..20 chars (it prefixes namespace names);
                                       # default: the file's name without .yaml
    cluster:                           # every key optional; defaults shown
      underlay: 172.30.0.0/24          # node uplinks + client + load balancer IPs
                                       # (a /16 at most)
      underlayMTU: 1500
      clusterNetwork: 10.244.0.0/16    # pod addresses; one subnet per node
      subnetLen: 24                    # prefix of each node's subnet: 16..30, and
                                       # at most 16 bits longer than clusterNetwork's
                                       # (underlay, clusterNetwork and serviceRange
                                       # avoid 0/8, 127/8, 169.254/16, 224/4, 240/4)
      serviceRange: 10.96.0.0/16       # Service cluster IPs (prefix /12 or longer)
      nodePortRange: 30000-32767       # or [30000, 32767]
      backend: udp                     # udp | vxlan | host-gw, or a mapping:
                                       #   {type: udp, port: 8285}
                                       #   {type: vxlan, vni: 1, port: 8472}
      proxyMode: nftables              # nftables | iptables
      loadBalancerPool: 172.30.0.200-172.30.0.220
                                       # or a CIDR, an address, or a list of those;
                                       # default: the top 16 usable underlay
                                       # addresses minus the client's and fixed
                                       # node addresses; [] for no pool
      clientAddress: 172.30.0.254      # the external client; default: the last
                                       # usable underlay address
      timeScale: 1                     # multiplies controller delays (> 0)
      apiServerNode: srv-k8s-master1   # where the Kubernetes API listens (:8080); default:
                                       # the first unschedulable node, else the first
      link: {rate: 100mbit, loss: 0.1%} # every node uplink's impairment, both
                                       # directions: rate (tc units), loss and
                                       # duplicate (percent), limit (packets,
                                       # with rate), delay and jitter (20ms,
                                       # 500us), reorder (percent, with delay);
                                       # default: none
    machines:                          # optional: one cluster over several machines
      - name: m1                       # (needs --store etcd://; see README); the
        address: 192.168.77.1          # first runs `netemu up`, the others `netemu
      - name: m2                       # join`; address: where the others reach it.
        address: 192.168.77.2          # With machines, underlayMTU defaults to 1450
                                       # (the fabric crosses in 50 bytes of VXLAN)
    nodes:                             # at least one
      - name: srv-k8s-master1          # DNS-1123 label, unique
        unschedulable: true            # like `kubectl cordon`; default false
        labels: {role: master}         # kubernetes.io/hostname and kubernetes.io/os
                                       # are added, as kubelet does
      - name: srv-k8s-node2
        address: 172.30.0.233          # fixed underlay address (default: the lowest
                                       # free one)
        podCIDR: 10.244.96.0/24        # requested subnet: inside clusterNetwork,
                                       # prefix subnetLen (default: leased)
        link: {rate: 10mbit}           # this uplink: these keys over cluster.link
        machine: m2                    # with machines: where it runs (default: the
                                       # API server's node on the first machine, the
                                       # others where fewest nodes are so far)
    workloads:                         # created in this order once the cluster is up
      - ../manifests/nginxpod.yaml     # a manifest file or directory, relative to
                                       # this file (multi-document YAML allowed)
      - apiVersion: v1                 # or an object written inline
        kind: Pod
        metadata: {name: inline}
        spec: {containers: [{name: c, image: nginx}]}

Workload objects get what kubectl and the API server would do to them
(netemu.topology.manifests): old apiVersions converted, Kubernetes' defaults
filled in, Kubernetes' validation; a manifest field Kubernetes does not know is
a warning (and dropped), not an error.

Command-line flags (`netemu up FILE --name --backend --proxy-mode`) override the
file before validation. Errors are TopologyError, one line each:
"<file>: <field path or document>: <problem>". Warnings (fields netemu ignores,
networks the machine also uses, ...) are returned in Topology.warnings.
"""

from __future__ import annotations

import difflib
import os
import json
import re
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Iterable

from netemu import impairment
from netemu.impairment import Impairment

from . import names
from .manifests import (Entry, Origin, check_batch, describe, manifest_files, normalize_object,
                        object_label, read_manifest_file)
from .model import (BACKENDS, DEFAULT_LB_POOL_SPAN, PROXY_MODES, ClusterSettings, MachineSpec,
                    NodeSpec, Topology, TopologyError)
from .yamlsource import file_problem, load_documents, read_text

TOP_KEYS = ("name", "cluster", "machines", "nodes", "workloads")
MACHINE_KEYS = ("name", "address")
CLUSTER_KEYS = ("underlay", "underlayMTU", "clusterNetwork", "subnetLen", "serviceRange",
                "nodePortRange", "backend", "proxyMode", "loadBalancerPool", "clientAddress",
                "timeScale", "apiServerNode", "link")
BACKEND_KEYS = ("type", "port", "vni")
NODE_KEYS = ("name", "labels", "address", "podCIDR", "unschedulable", "link", "machine")
CLUSTER_NAME_MAX = 20
LB_POOL_MAX = 65536          # a pool is expanded to a list; refuse absurd ones
# The underlay's addresses are listed when nodes are placed on it; a /16 holds
# 65,534 nodes, far more than one machine runs, and keeps that list small.
UNDERLAY_MIN_PREFIX = 16
# A node's pod subnet is listed by its IPAM: at most a /16 (65,534 pods).
SUBNET_LEN_MIN = 16
# kube-controller-manager refuses a node CIDR size more than 16 bits longer than
# the cluster CIDR's (clusterSubnetMaxDiff: "the node CIDR size is too big"): at
# most 65,536 node subnets, which every overlay daemon chooses its lease among.
SUBNET_BITS_MAX = 16
# Ranges that are not unicast addresses a network can route between namespaces:
# the kernel refuses them as interface addresses or routes (multicast, class E),
# or gives them a meaning of their own (this-network, loopback, link-local).
SPECIAL_NETWORKS = (
    (IPv4Network("0.0.0.0/8"), 'the "this network" range 0.0.0.0/8'),
    (IPv4Network("127.0.0.0/8"), "the loopback range 127.0.0.0/8"),
    (IPv4Network("169.254.0.0/16"), "the link-local range 169.254.0.0/16"),
    (IPv4Network("224.0.0.0/4"), "the multicast range 224.0.0.0/4"),
    (IPv4Network("240.0.0.0/4"), "the reserved range 240.0.0.0/4"),
)


class _File:
    """Error helper bound to the topology file."""

    def __init__(self, display: str):
        self.display = display

    def error(self, where: str, problem: str) -> TopologyError:
        return TopologyError(self.display, where, problem)


def _unknown_keys(f: _File, mapping: dict, allowed: Iterable[str], path: str) -> None:
    allowed = tuple(allowed)
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            where = f"{path}.{key}" if path else str(key)
            raise f.error(where, f"unknown key (allowed: {', '.join(allowed)}){hint}")


def _mapping(f: _File, value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise f.error(where, f"must be a mapping, got {describe(value)}")
    return value


def _int(f: _File, value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise f.error(where, f"must be an integer, got {describe(value)}")
    if not low <= value <= high:
        raise f.error(where, f"must be between {low} and {high}, got {value}")
    return value


def _choice(f: _File, value: Any, where: str, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        shown = f'"{value}"' if isinstance(value, str) else describe(value)
        raise f.error(where, f"unknown {what} {shown} (valid: {', '.join(allowed)})")
    return value


def _network(f: _File, value: Any, where: str) -> IPv4Network:
    if not isinstance(value, str) or "/" not in value:
        raise f.error(where, f"must be a CIDR like 10.244.0.0/16, got {describe(value)}")
    try:
        return IPv4Network(value)
    except ValueError as exc:
        try:
            loose = IPv4Network(value, strict=False)
        except ValueError:
            raise f.error(where, f'invalid CIDR "{value}": {exc}') from None
        raise f.error(where, f'invalid CIDR "{value}": host bits are set (did you mean {loose}?)') from None


def _unicast_network(f: _File, value: Any, where: str, min_prefix: int = 0) -> IPv4Network:
    """A CIDR for addresses the cluster gives out (underlay, pods, services), of
    prefix MIN_PREFIX or longer."""
    net = _network(f, value, where)
    if net.prefixlen < min_prefix:
        raise f.error(where, f"{net} is too large: use a /{min_prefix} or smaller")
    for special, what in SPECIAL_NETWORKS:
        if net.overlaps(special):
            raise f.error(where, f"{net} overlaps {what}: use a private range such as 10.0.0.0/8, "
                          "172.16.0.0/12 or 192.168.0.0/16")
    return net


def _address(f: _File, value: Any, where: str) -> IPv4Address:
    if not isinstance(value, str):
        raise f.error(where, f"must be an IPv4 address, got {describe(value)}")
    try:
        return IPv4Address(value)
    except ValueError as exc:
        raise f.error(where, f'invalid IPv4 address "{value}": {exc}') from None


# ---------------------------------------------------------------------------
# cluster:

def _port_range(f: _File, value: Any, where: str) -> tuple[int, int]:
    malformed = f.error(where, f'must be "FIRST-LAST" like "30000-32767" or [FIRST, LAST], got {describe(value)}')
    if isinstance(value, str):
        # At most 10 digits: int() of a longer one is slow or refused (Python's
        # int-string limit), and no port has more than 5.
        m = re.fullmatch(r"\s*(\d{1,10})\s*-\s*(\d{1,10})\s*", value)
        if not m:
            raise malformed
        first, last = int(m.group(1)), int(m.group(2))
    elif isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        first, last = value
    else:
        raise malformed
    if not 1 <= first <= last <= 65535:
        raise f.error(where, f"must satisfy 1 <= FIRST <= LAST <= 65535, got {first}-{last}")
    return first, last


def _lb_pool(f: _File, value: Any, where: str) -> list[IPv4Address]:
    items = value if isinstance(value, list) else [value]
    pool: list[IPv4Address] = []
    seen: set[IPv4Address] = set()
    for i, item in enumerate(items):
        iwhere = f"{where}[{i}]" if isinstance(value, list) else where
        if not isinstance(item, str):
            raise f.error(iwhere, f"must be an address, a range FIRST-LAST or a CIDR, got {describe(item)}")
        if "/" in item:
            net = _network(f, item, iwhere)
            if net.num_addresses > LB_POOL_MAX:
                raise f.error(iwhere, f"{net} is too large for a pool (at most {LB_POOL_MAX} addresses)")
            addrs = list(net)
        elif "-" in item:
            first_s, _, last_s = item.partition("-")
            first, last = _address(f, first_s.strip(), iwhere), _address(f, last_s.strip(), iwhere)
            if first > last:
                raise f.error(iwhere, f"range {item} is empty: {first} comes after {last}")
            if int(last) - int(first) >= LB_POOL_MAX:
                raise f.error(iwhere, f"range {item} is too large for a pool (at most {LB_POOL_MAX} addresses)")
            addrs = [first + k for k in range(int(last) - int(first) + 1)]
        else:
            addrs = [_address(f, item, iwhere)]
        for a in addrs:
            if a in seen:
                raise f.error(iwhere, f"{a} is already in the pool")
            seen.add(a)
            pool.append(a)
    return pool


def _link(f: _File, value: Any, where: str, base: dict) -> Impairment:
    """A `link:` mapping, its keys over BASE's (the cluster-wide default)."""
    props = _mapping(f, value, where)
    try:
        return impairment.parse({**base, **props}, where)
    except impairment.ImpairmentError as e:
        raise f.error(e.where, e.problem) from None


def parse_settings(f: _File, cluster: Any, *, backend: str | None = None,
                   proxy_mode: str | None = None) -> tuple[ClusterSettings, bool]:
    """The `cluster:` mapping (+ CLI overrides) -> (settings, pool given explicitly).

    Checks each value alone and the three networks against each other; the
    checks that need the nodes are in load_topology.
    """
    s = ClusterSettings()
    c = _mapping(f, cluster, "cluster") if cluster is not None else {}
    _unknown_keys(f, c, CLUSTER_KEYS, "cluster")
    if "underlay" in c:
        # The nodes, the client and the load-balancer addresses live on it.
        s.underlay = _unicast_network(f, c["underlay"], "cluster.underlay", UNDERLAY_MIN_PREFIX)
    if s.underlay.prefixlen > 30:
        raise f.error("cluster.underlay", f"{s.underlay} is too small: use a /30 or larger "
                      "(nodes, the client and load-balancer addresses live on it)")
    if "underlayMTU" in c:
        s.underlay_mtu = _int(f, c["underlayMTU"], "cluster.underlayMTU", 576, 65535)
    if "clusterNetwork" in c:
        s.cluster_network = _unicast_network(f, c["clusterNetwork"], "cluster.clusterNetwork")
    if "subnetLen" in c:
        s.subnet_len = _int(f, c["subnetLen"], "cluster.subnetLen", SUBNET_LEN_MIN, 30)
    if s.subnet_len <= s.cluster_network.prefixlen:
        raise f.error("cluster.subnetLen", f"must be longer than clusterNetwork's prefix "
                      f"({s.cluster_network}), got {s.subnet_len}")
    if s.subnet_len - s.cluster_network.prefixlen > SUBNET_BITS_MAX:
        raise f.error("cluster.subnetLen", f"/{s.subnet_len} cuts clusterNetwork {s.cluster_network} into "
                      f"{s.subnet_count()} node subnets, more than {2 ** SUBNET_BITS_MAX}: the node "
                      f"subnet may be at most {SUBNET_BITS_MAX} bits longer than clusterNetwork's prefix "
                      f"(use subnetLen {s.cluster_network.prefixlen + SUBNET_BITS_MAX} or less, or a "
                      "smaller clusterNetwork)")
    if "serviceRange" in c:
        s.service_range = _unicast_network(f, c["serviceRange"], "cluster.serviceRange")
    if s.service_range.prefixlen < 12:
        # kube-apiserver: "specified --service-cluster-ip-range is too large"
        raise f.error("cluster.serviceRange", f"{s.service_range} is too large: the prefix must be /12 or longer")
    if s.service_range.prefixlen > 30:
        raise f.error("cluster.serviceRange", f"{s.service_range} is too small: use a /30 or larger")
    networks = [("cluster.underlay", s.underlay), ("cluster.clusterNetwork", s.cluster_network),
                ("cluster.serviceRange", s.service_range)]
    for i, (name_a, net_a) in enumerate(networks):
        for name_b, net_b in networks[i + 1:]:
            if net_a.overlaps(net_b):
                raise f.error(name_b, f"{net_b} overlaps {name_a} {net_a}")
    if "nodePortRange" in c:
        s.node_port_range = _port_range(f, c["nodePortRange"], "cluster.nodePortRange")

    if "backend" in c:
        b = c["backend"]
        if isinstance(b, str):
            s.backend = _choice(f, b, "cluster.backend", BACKENDS, "backend")
        else:
            b = _mapping(f, b, "cluster.backend")
            _unknown_keys(f, b, BACKEND_KEYS, "cluster.backend")
            if "type" not in b:
                raise f.error("cluster.backend.type", f"required (one of {', '.join(BACKENDS)})")
            s.backend = _choice(f, b["type"], "cluster.backend.type", BACKENDS, "backend")
            if "port" in b:
                s.backend_port = _int(f, b["port"], "cluster.backend.port", 1, 65535)
            if "vni" in b:
                s.vni = _int(f, b["vni"], "cluster.backend.vni", 0, 2 ** 24 - 1)
                if s.backend != "vxlan":
                    raise f.error("cluster.backend.vni", f"only the vxlan backend has a VNI, not {s.backend}")
    if backend is not None:
        chosen = _choice(f, backend, "--backend", BACKENDS, "backend")
        if chosen != s.backend:
            s.backend_port = None     # the file's port was meant for its own backend
            s.backend = chosen
    if s.backend == "host-gw" and s.backend_port is not None:
        raise f.error("cluster.backend.port", "host-gw encapsulates nothing and has no port")

    if "proxyMode" in c:
        s.proxy_mode = _choice(f, c["proxyMode"], "cluster.proxyMode", PROXY_MODES, "proxyMode")
    if proxy_mode is not None:
        s.proxy_mode = _choice(f, proxy_mode, "--proxy-mode", PROXY_MODES, "proxy mode")
    if "timeScale" in c:
        t = c["timeScale"]
        # Finite: an infinite scale (YAML's .inf) would make every delay infinite.
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise f.error("cluster.timeScale", f"must be a finite number greater than 0, got {describe(t)}")
        s.time_scale = float(t)
    if "clientAddress" in c:
        s.client_address = _address(f, c["clientAddress"], "cluster.clientAddress")
        _check_on_underlay(f, s, s.client_address, "cluster.clientAddress")
    if c.get("link") is not None:
        s.link = _link(f, c["link"], "cluster.link", {})
    explicit_pool = "loadBalancerPool" in c
    if explicit_pool:
        s.lb_pool = _lb_pool(f, c["loadBalancerPool"], "cluster.loadBalancerPool")
        client = s.effective_client_address()
        for a in s.lb_pool:
            _check_on_underlay(f, s, a, "cluster.loadBalancerPool")
            if a == client:
                raise f.error("cluster.loadBalancerPool", f"{a} is the client's address")
    return s, explicit_pool


def _check_on_underlay(f: _File, s: ClusterSettings, addr: IPv4Address, where: str) -> None:
    if addr not in s.underlay:
        raise f.error(where, f"{addr} is outside cluster.underlay {s.underlay}")
    if addr in (s.underlay.network_address, s.underlay.broadcast_address):
        raise f.error(where, f"{addr} is the network or broadcast address of {s.underlay}")


# ---------------------------------------------------------------------------
# nodes:

def parse_nodes(f: _File, value: Any, s: ClusterSettings, *, links_over_cluster: bool = True) -> list[NodeSpec]:
    """The `nodes:` list. LINKS_OVER_CLUSTER: a node's `link:` keys go over
    cluster.link (a file); False: a node's `link:` is its whole link, {} for
    none (the settings the store keeps, see load_topology_stored)."""
    if value is None:
        raise f.error("nodes", "required: a list of at least one node")
    if not isinstance(value, list) or not value:
        raise f.error("nodes", f"must be a list of at least one node, got {describe(value)}")
    nodes: list[NodeSpec] = []
    by_name: dict[str, int] = {}
    by_address: dict[IPv4Address, int] = {}
    by_cidr: dict[IPv4Network, int] = {}
    client = s.effective_client_address()
    for i, raw in enumerate(value):
        where = f"nodes[{i}]"
        raw = _mapping(f, raw, where)
        _unknown_keys(f, raw, NODE_KEYS, where)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise f.error(f"{where}.name", f"required: a DNS-1123 label, got {describe(name)}")
        problem = names.dns1123_label(name)
        if problem:
            raise f.error(f"{where}.name", f'invalid node name "{name}": {problem}')
        if name in by_name:
            raise f.error(f"{where}.name", f'duplicate node name "{name}" (also nodes[{by_name[name]}])')
        by_name[name] = i

        labels = raw.get("labels") or {}
        labels = _mapping(f, labels, f"{where}.labels")
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str):
                bad = k if not isinstance(k, str) else v
                raise f.error(f"{where}.labels.{k}", f"keys and values must be strings, got {describe(bad)} (quote it)")
            problem = names.label_key(k) or names.label_value(v)
            if problem:
                raise f.error(f"{where}.labels.{k}", f'Invalid value: "{k}: {v}": {problem}')
        labels = {**labels}
        labels.setdefault("kubernetes.io/hostname", name)     # as kubelet registers them
        labels.setdefault("kubernetes.io/os", "linux")

        address = None
        if raw.get("address") is not None:
            address = _address(f, raw["address"], f"{where}.address")
            _check_on_underlay(f, s, address, f"{where}.address")
            if address == client:
                raise f.error(f"{where}.address", f"{address} is the client's address (cluster.clientAddress)")
            if address in s.lb_pool:
                raise f.error(f"{where}.address", f"{address} is in cluster.loadBalancerPool")
            if address in by_address:
                raise f.error(f"{where}.address", f"duplicate address {address} (also nodes[{by_address[address]}])")
            by_address[address] = i

        pod_cidr = None
        if raw.get("podCIDR") is not None:
            pod_cidr = _network(f, raw["podCIDR"], f"{where}.podCIDR")
            if not pod_cidr.subnet_of(s.cluster_network):
                raise f.error(f"{where}.podCIDR", f"{pod_cidr} is outside cluster.clusterNetwork {s.cluster_network}")
            if pod_cidr.prefixlen != s.subnet_len:
                raise f.error(f"{where}.podCIDR", f"{pod_cidr} must have prefix /{s.subnet_len} (cluster.subnetLen)")
            if pod_cidr in by_cidr:
                raise f.error(f"{where}.podCIDR", f"duplicate podCIDR {pod_cidr} (also nodes[{by_cidr[pod_cidr]}])")
            by_cidr[pod_cidr] = i

        unschedulable = raw.get("unschedulable", False)
        if not isinstance(unschedulable, bool):
            raise f.error(f"{where}.unschedulable", f"must be true or false, got {describe(unschedulable)}")
        link = None
        if raw.get("link") is not None:
            link = _link(f, raw["link"], f"{where}.link", s.link.settings() if links_over_cluster else {})
        machine = raw.get("machine")
        if machine is not None and not isinstance(machine, str):
            raise f.error(f"{where}.machine", f"must be the name of one of machines:, got {describe(machine)}")
        nodes.append(NodeSpec(name=name, labels=labels, address=address, pod_cidr=pod_cidr,
                              unschedulable=unschedulable, link=link, machine=machine))
    return nodes


# The cluster's fabric crosses machines in VXLAN: 50 bytes of outer IPv4, UDP,
# VXLAN and inner Ethernet headers on every fabric frame.
MACHINE_TUNNEL_OVERHEAD = 50
MACHINE_LINK_MTU = 1500         # what a machine's network is assumed to carry


def parse_machines(f: _File, value: Any) -> list[MachineSpec]:
    """The `machines:` list (absent: the cluster runs on this machine alone)."""
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise f.error("machines", f"must be a list of at least one machine ({{name, address}}), "
                      f"got {'an empty list' if value == [] else describe(value)}")
    machines: list[MachineSpec] = []
    seen_name: dict[str, int] = {}
    seen_address: dict[IPv4Address, int] = {}
    for i, raw in enumerate(value):
        where = f"machines[{i}]"
        raw = _mapping(f, raw, where)
        _unknown_keys(f, raw, MACHINE_KEYS, where)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise f.error(f"{where}.name", f"required: a DNS-1123 label, got {describe(name)}")
        problem = names.dns1123_label(name)
        if problem:
            raise f.error(f"{where}.name", f'invalid machine name "{name}": {problem}')
        if name in seen_name:
            raise f.error(f"{where}.name", f'duplicate machine name "{name}" (also machines[{seen_name[name]}])')
        seen_name[name] = i
        if raw.get("address") is None:
            raise f.error(f"{where}.address", "required: the IPv4 address the other machines reach it at")
        address = _address(f, raw["address"], f"{where}.address")
        if address.is_loopback or address.is_multicast or address.is_unspecified or address.is_link_local:
            raise f.error(f"{where}.address", f"{address} is not an address another machine can reach")
        if address in seen_address:
            raise f.error(f"{where}.address", f"duplicate address {address} (also machines[{seen_address[address]}])")
        seen_address[address] = i
        machines.append(MachineSpec(name=name, address=address))
    return machines


def place_nodes(f: _File, machines: list[MachineSpec], nodes: list[NodeSpec], master: str) -> None:
    """Check each node's `machine:` and give the others one: the API server's
    node on the first machine (whose control plane serves the API from it),
    then each node to the machine with the fewest nodes so far (file order on
    a tie)."""
    index = {m.name: i for i, m in enumerate(machines)}
    for i, n in enumerate(nodes):
        if n.machine is None:
            continue
        if not machines:
            raise f.error(f"nodes[{i}].machine", "the file has no machines: list them in machines: first")
        if n.machine not in index:
            raise f.error(f"nodes[{i}].machine", f'unknown machine "{n.machine}" (machines: '
                          f"{', '.join(index)})")
    if not machines:
        return
    first = machines[0].name
    for i, n in enumerate(nodes):
        if n.name == master:
            if n.machine is None:
                n.machine = first
            elif n.machine != first:
                raise f.error(f"nodes[{i}].machine", f'node "{n.name}" serves the Kubernetes API '
                              f"(cluster.apiServerNode, or the first unschedulable node): it must be on the "
                              f'first machine, "{first}", where netemu up runs the control plane')
    count = {m.name: 0 for m in machines}
    for n in nodes:
        if n.machine is not None:
            count[n.machine] += 1
    for n in nodes:
        if n.machine is None:
            n.machine = min(count, key=lambda m: (count[m], index[m]))
            count[n.machine] += 1


def _fit_underlay(f: _File, s: ClusterSettings, nodes: list[NodeSpec], explicit_pool: bool,
                  warnings: list[str]) -> None:
    """Fill in the default LoadBalancer pool and check the underlay holds everyone."""
    client = s.effective_client_address()
    fixed = {n.address for n in nodes if n.address is not None}
    usable = s.underlay.num_addresses - 2
    if not explicit_pool:
        last = s.underlay.broadcast_address - 1
        top = [last - k for k in range(min(DEFAULT_LB_POOL_SPAN, usable))]
        s.lb_pool = sorted(a for a in top if a != client and a not in fixed)
    s.client_address = client      # the builder reads it from here
    unfixed = sum(1 for n in nodes if n.address is None)
    taken = len(fixed | {client} | set(s.lb_pool))
    shortfall = unfixed - (usable - taken)
    if shortfall <= 0:
        return
    if not explicit_pool and shortfall <= len(s.lb_pool):
        s.lb_pool = s.lb_pool[shortfall:]
        warnings.append(f"{f.display}: cluster.loadBalancerPool: the underlay {s.underlay} leaves only "
                        f"{len(s.lb_pool)} address(es) for LoadBalancer services")
        return
    if not explicit_pool:
        s.lb_pool = []                 # the default pool can shrink to nothing: not the problem
    raise f.error("cluster.underlay", f"{s.underlay} has {usable} usable addresses but needs "
                  f"{len(nodes) + 1 + len(s.lb_pool)}: {len(nodes)} node(s), 1 client, "
                  f"{len(s.lb_pool)} load-balancer address(es)")


# ---------------------------------------------------------------------------
# The machine's own networks (a warning, never an error)

def read_host_networks() -> list[IPv4Network]:
    """IPv4 destinations in the root namespace's routing tables (read-only).

    Default routes are left out: everything overlaps them.
    """
    try:
        out = subprocess.run(["ip", "-4", "-j", "route", "show", "table", "all"],
                             capture_output=True, text=True, check=True, timeout=10).stdout
        routes = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    nets: list[IPv4Network] = []
    for r in routes:
        dst = r.get("dst", "default")
        if dst == "default":
            continue
        try:
            net = IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if net not in nets:
            nets.append(net)
    return nets


def host_network_warnings(settings: ClusterSettings, host_networks: Iterable[IPv4Network],
                          file: str = "") -> list[str]:
    """Warnings for cluster networks that overlap networks the machine uses.

    netemu's traffic stays inside its namespaces, so this breaks nothing; but the
    same addresses then mean two things on this machine, which misleads whoever
    reads routes or captures (and a cluster stretched over machines would break).
    """
    warnings = []
    host_networks = list(host_networks)
    for field_name, net in (("cluster.underlay", settings.underlay),
                            ("cluster.clusterNetwork", settings.cluster_network),
                            ("cluster.serviceRange", settings.service_range)):
        clashes = [h for h in host_networks if h.overlaps(net)]
        if clashes:
            shown = ", ".join(str(h) for h in clashes[:5]) + (" ..." if len(clashes) > 5 else "")
            warnings.append(f"{file}: {field_name}: {net} overlaps network(s) this machine routes "
                            f"({shown}); harmless inside netemu's namespaces, but confusing in captures")
    return warnings


# ---------------------------------------------------------------------------
# workloads:

def _workload_entries(f: _File, value: Any, base: Path) -> list[Entry]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise f.error("workloads", f"must be a list of manifest paths or objects, got {describe(value)}")
    entries: list[Entry] = []
    for i, item in enumerate(value):
        where = f"workloads[{i}]"
        if isinstance(item, str):
            if "\0" in item:
                shown = item.replace("\0", "\\x00")
                raise f.error(where, f'Invalid value: "{shown}": a path must not contain a NUL character')
            path = Path(os.path.normpath(base / item))     # shown in messages: keep it short
            files = manifest_files(path) if path.exists() else [path]
            if not files:
                raise f.error(where, f"{path} holds no .yaml, .yml or .json file")
            for file in files:
                # Refused from stat() alone, before an open() could block on a
                # FIFO or a read never end (/dev/zero).
                problem = file_problem(file)
                if problem:
                    raise f.error(where, f"{file}: {problem}")
                entries.extend(read_manifest_file(file))
        elif isinstance(item, dict):
            obj, warnings = normalize_object(item, f.display, where)
            entries.append(Entry(obj, Origin(f.display, where + object_label(obj["kind"], obj["metadata"]),
                                             warnings)))
        else:
            raise f.error(where, f"must be a manifest path or a Kubernetes object, got {describe(item)}")
    return entries


# ---------------------------------------------------------------------------

def load_topology(path, *, name: str | None = None, backend: str | None = None,
                  proxy_mode: str | None = None,
                  host_networks: Iterable[IPv4Network] | None = None) -> Topology:
    """Read and validate a topology file; CLI flags override the file first.

    host_networks: the machine's networks for the overlap warning; None reads
    them from the root namespace's routes (read-only). Raises TopologyError.
    """
    path = Path(path)
    f = _File(str(path))
    docs = [d for d in load_documents(read_text(path, f.display), f.display) if d.data is not None]
    if not docs:
        raise f.error("", "empty file: a topology needs at least `nodes:`")
    if len(docs) > 1:
        raise f.error(f"document {docs[1].index}", "a topology file holds one YAML document "
                      "(put Kubernetes objects under workloads:)")
    return _topology(f, docs[0].data, path, path.stem, path.parent, name=name, backend=backend,
                     proxy_mode=proxy_mode, host_networks=host_networks)


DICT_DISPLAY = "<dict>"


def load_topology_dict(data: Any, *, name: str | None = None, backend: str | None = None,
                       proxy_mode: str | None = None, base: str | os.PathLike | None = None,
                       host_networks: Iterable[IPv4Network] | None = None) -> Topology:
    """Validate a topology given as a dict shaped like a topology file (the
    Python API's netemu.up): the same checks and the same one-line errors, with
    "<dict>" where a file's name would be. Manifest paths under workloads: are
    relative to BASE (default: the current directory); a dict has no file name
    to default the cluster's name from, so `name` is required (in DATA or as an
    argument). DATA is copied: changing it later changes nothing."""
    import copy

    f = _File(DICT_DISPLAY)
    base_dir = Path(base) if base is not None else Path.cwd()
    return _topology(f, copy.deepcopy(data), None, None, base_dir, name=name, backend=backend,
                     proxy_mode=proxy_mode, host_networks=host_networks)


def load_topology_stored(data: Any, display: str) -> Topology:
    """A running cluster's settings as the store keeps them (netemu.clusterconfig):
    a topology mapping with every default written out, no workloads, and each
    node's `link:` its whole link rather than keys over cluster.link. The same
    checks and one-line errors as a file's, DISPLAY naming where it came from."""
    f = _File(display)
    top = _mapping(f, data, "")
    if "workloads" in top:
        raise f.error("workloads", "not part of a cluster's stored settings")
    if "name" not in top:
        raise f.error("name", "required: the cluster's name")
    return _topology(f, data, None, None, Path("."), name=None, backend=None, proxy_mode=None,
                     host_networks=[], links_over_cluster=False)


def _topology(f: _File, data: Any, source: Path | None, default_name: str | None, base: Path, *,
              name: str | None, backend: str | None, proxy_mode: str | None,
              host_networks: Iterable[IPv4Network] | None, links_over_cluster: bool = True) -> Topology:
    """The checks shared by files and dicts: DATA is the topology's one mapping."""
    top = _mapping(f, data, "")
    _unknown_keys(f, top, TOP_KEYS, "")

    warnings: list[str] = []
    if name is not None:
        cluster_name, name_where = name, "--name"
    elif "name" in top:
        cluster_name, name_where = top["name"], "name"
    elif default_name is not None:
        cluster_name, name_where = default_name, "name (taken from the file name)"
    else:
        raise f.error("name", "required: the cluster's name (a dict has no file name to take it from)")
    if not isinstance(cluster_name, str) or not cluster_name:
        raise f.error(name_where, f"must be a non-empty string, got {describe(cluster_name)}")
    if len(cluster_name) > CLUSTER_NAME_MAX or names.dns1123_label(cluster_name):
        raise f.error(name_where, f'invalid cluster name "{cluster_name}": use 1 to {CLUSTER_NAME_MAX} '
                      "lowercase letters, digits or '-', starting and ending with a letter or digit "
                      "(it prefixes namespace names)")

    settings, explicit_pool = parse_settings(f, top.get("cluster"), backend=backend, proxy_mode=proxy_mode)
    nodes = parse_nodes(f, top.get("nodes"), settings, links_over_cluster=links_over_cluster)
    if len(nodes) > settings.subnet_count():
        raise f.error("cluster.clusterNetwork", f"{settings.cluster_network} holds {settings.subnet_count()} "
                      f"subnet(s) of /{settings.subnet_len}, fewer than the {len(nodes)} nodes")
    _fit_underlay(f, settings, nodes, explicit_pool, warnings)
    api_node = (top.get("cluster") or {}).get("apiServerNode")
    if api_node is not None:
        if api_node not in [n.name for n in nodes]:
            raise f.error("cluster.apiServerNode", f"{describe(api_node)} is not one of the nodes "
                          f"({', '.join(n.name for n in nodes)})")
        settings.api_server_node = api_node
    machines = parse_machines(f, top.get("machines"))
    topology = Topology(name=cluster_name, source=source, settings=settings, nodes=nodes, objects=[],
                        warnings=warnings, machines=machines)
    place_nodes(f, machines, nodes, topology.master_node())
    if machines and "underlayMTU" not in (top.get("cluster") or {}):
        # The fabric's frames cross the machines' network inside VXLAN.
        settings.underlay_mtu = MACHINE_LINK_MTU - MACHINE_TUNNEL_OVERHEAD
    if all(n.unschedulable for n in nodes):
        warnings.append(f"{f.display}: nodes: every node is unschedulable: only DaemonSet pods "
                        "and pods with spec.nodeName will run")

    entries = _workload_entries(f, top.get("workloads"), base)
    warnings.extend(check_batch(entries, settings, nodes))
    if host_networks is None:
        host_networks = read_host_networks()
    warnings.extend(host_network_warnings(settings, host_networks, f.display))
    topology.objects = [e.obj for e in entries]
    return topology
