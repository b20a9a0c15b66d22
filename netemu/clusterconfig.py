"""A running cluster's settings, kept in its store as the ConfigMap
kube-system/netemu-cluster: the one place every process reads them from.

Why a ConfigMap in kube-system: it is where a Kubernetes reader looks for a
cluster's own configuration (kubeadm keeps its ClusterConfiguration in
kube-system/kubeadm-config, kube-proxy its settings in kube-system/kube-proxy,
flannel its net-conf.json in kube-flannel/kube-flannel-cfg), it needs no new
API group or kind, and it sits in the store beside the objects it describes, so
that whoever can read the store (a node agent, later one on another machine)
can read the settings too: no side file.

Its one data key, topology.json, is the topology as netemu up took it, in the
topology file's own vocabulary (`name:`, `cluster:`, `nodes:`, see
netemu.topology.loader), with every default the loader filled in written out
(the client's address, the load-balancer pool, the backend's port) and without
the workloads (those are objects in the store). One difference from a file: a
node's `link:` is the node's whole uplink, not keys over cluster.link (`{}`:
none, after `netemu link set NODE --clear`). JSON, as flannel keeps its
net-conf.json in its ConfigMap: every process reads this at its start, and
JSON parses in C (tools/bench_settings.py: YAML's pure-Python parser took about
1 s for 1,000 nodes); JSON is YAML too, so the text is still a topology file.

    read(cluster)               THE reader: the settings as a Topology (name,
                                settings, nodes); everything that needs them
                                calls it
    create(store, topology)     at netemu up
    update(cluster, change)     netemu link set / node add / node remove:
                                read, CHANGE(topology), write back only if
                                the object's resourceVersion is still the one
                                read (compare-and-swap), else again
    encode / decode             ConfigMap <-> Topology (pure, unit-tested)

Decoding runs the loader's checks (netemu.topology.loader.load_topology_stored),
so a damaged object is refused with the loader's one-line errors, naming the
object and the field.
"""

from __future__ import annotations

import copy
import json
from ipaddress import IPv4Address
from typing import Callable

from netemu import names
from netemu.store import registry
from netemu.store.base import Conflict
from netemu.topology.model import Topology, TopologyError

NAMESPACE = "kube-system"
NAME = "netemu-cluster"
DATA_KEY = "topology.json"
DISPLAY = f"configmap {NAMESPACE}/{NAME}"
UPDATE_TRIES = 20


class ClusterConfigError(TopologyError):
    """The stored settings are missing or damaged (one line)."""


def _pool_ranges(pool: list[IPv4Address]) -> list[str]:
    """The load-balancer pool as the file writes it: runs of consecutive
    addresses as FIRST-LAST, lone ones as themselves (a /16's pool is one line,
    not 65,000)."""
    out: list[str] = []
    run: list[IPv4Address] = []
    for a in pool:
        if run and int(a) == int(run[-1]) + 1:
            run.append(a)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [a]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return out


def to_mapping(topology: Topology) -> dict:
    """TOPOLOGY as a topology mapping, every default written out (see the
    module's docstring)."""
    s = topology.settings
    backend: dict = {"type": s.backend}
    if s.backend_port is not None:
        backend["port"] = s.backend_port
    if s.backend == "vxlan":
        backend["vni"] = s.vni
    cluster = {
        "underlay": str(s.underlay),
        "underlayMTU": s.underlay_mtu,
        "clusterNetwork": str(s.cluster_network),
        "subnetLen": s.subnet_len,
        "serviceRange": str(s.service_range),
        "nodePortRange": f"{s.node_port_range[0]}-{s.node_port_range[1]}",
        "backend": backend,
        "proxyMode": s.proxy_mode,
        "loadBalancerPool": _pool_ranges(list(s.lb_pool)),
        "clientAddress": str(s.effective_client_address()),
        "timeScale": s.time_scale,
        "link": s.link.settings(),
    }
    # Only a node that still exists (the API server's node may have been removed).
    if s.api_server_node and any(n.name == s.api_server_node for n in topology.nodes):
        cluster["apiServerNode"] = s.api_server_node
    nodes = []
    for n in topology.nodes:
        node: dict = {"name": n.name, "labels": dict(n.labels), "unschedulable": bool(n.unschedulable)}
        if n.address is not None:
            node["address"] = str(n.address)
        if n.pod_cidr is not None:
            node["podCIDR"] = str(n.pod_cidr)
        if n.link is not None:
            node["link"] = n.link.settings()
        if n.machine is not None:
            node["machine"] = n.machine
        nodes.append(node)
    out = {"name": topology.name, "cluster": cluster, "nodes": nodes}
    if topology.machines:
        out["machines"] = [{"name": m.name, "address": str(m.address)} for m in topology.machines]
    return out


def encode(topology: Topology) -> dict:
    """The ConfigMap that holds TOPOLOGY's settings (no resourceVersion)."""
    text = json.dumps(to_mapping(topology), indent=1) + "\n"
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": NAME, "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/managed-by": "netemu"}},
            "data": {DATA_KEY: text}}


def decode(obj: dict) -> Topology:
    """The Topology a stored ConfigMap holds (name, settings, nodes; no source,
    workloads or warnings). Raises ClusterConfigError naming the field."""
    if not isinstance(obj, dict) or obj.get("kind") != "ConfigMap":
        raise ClusterConfigError(DISPLAY, "kind", "must be a ConfigMap")
    data = obj.get("data")
    if not isinstance(data, dict) or not isinstance(data.get(DATA_KEY), str):
        raise ClusterConfigError(DISPLAY, f"data.{DATA_KEY}", "required: the cluster's topology as JSON text")
    from netemu.topology import loader

    display = f"{DISPLAY}: data.{DATA_KEY}"
    try:
        data = json.loads(data[DATA_KEY])
    except ValueError as e:
        raise ClusterConfigError(display, "", f"invalid JSON: {e}") from None
    try:
        return loader.load_topology_stored(data, display)
    except TopologyError as e:
        raise ClusterConfigError(e.file, e.where, e.problem) from None


def _get(store) -> dict | None:
    return registry.get(store, "ConfigMap", NAMESPACE, NAME)


def stored(store) -> dict | None:
    """The ConfigMap as the store holds it (None: the cluster is gone)."""
    return _get(store)


def _open(cluster: str):
    from netemu.store import open_store

    try:
        return open_store(cluster)
    except FileNotFoundError:
        raise ClusterConfigError(names.store_path(cluster), "",
                                 f'no state store: cluster "{cluster}" is not up') from None


def read(cluster: str, store=None) -> Topology:
    """CLUSTER's settings (name, settings, nodes), from the ConfigMap
    kube-system/netemu-cluster in its store. STORE: an open store of the
    cluster (None: open one for this read). Raises ClusterConfigError when the
    object is missing or damaged."""
    own = store is None
    if own:
        store = _open(cluster)
    try:
        obj = _get(store)
    finally:
        if own:
            store.close()
    if obj is None:
        raise ClusterConfigError(DISPLAY, "", f'not found in cluster "{cluster}"\'s store')
    return decode(obj)


def create(store, topology: Topology) -> dict:
    """Write TOPOLOGY's settings (netemu up). Conflict if they are there already."""
    return registry.create(store, encode(topology))


def update(cluster: str, change: Callable[[Topology], None], store=None) -> Topology:
    """Read the settings, CHANGE(topology) in place, write them back if nobody
    wrote them meanwhile (the object's resourceVersion, compare-and-swap), else
    read and change again. CHANGE may raise to refuse (nothing is written).
    Returns the topology written."""
    own = store is None
    if own:
        store = _open(cluster)
    try:
        for _ in range(UPDATE_TRIES):
            obj = _get(store)
            if obj is None:
                raise ClusterConfigError(DISPLAY, "", f'not found in cluster "{cluster}"\'s store')
            topology = decode(obj)
            change(topology)
            new = encode(topology)
            body = copy.deepcopy(obj)
            body["data"] = new["data"]
            try:
                registry.update(store, body)
            except Conflict:
                continue
            return topology
        raise Conflict(f"{DISPLAY}: too many concurrent updates")
    finally:
        if own:
            store.close()
