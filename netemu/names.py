"""Names and places of everything a cluster owns.

Every namespace, interface, file and process of a cluster carries the cluster's
name, so that two clusters never collide and `netemu clean` removes exactly what
is its own (it reads the cluster's journal, it does not guess by pattern).
"""

from __future__ import annotations

import hashlib
import os

STATE_ROOT = os.environ.get("NETEMU_STATE_ROOT", "/run/netemu")

# The environment variable every process of a cluster carries: how `clean` finds
# them after a crash, even when their parent is gone.
CLUSTER_ENV = "NETEMU_CLUSTER"

FABRIC_BRIDGE = "fabric0"
NODE_UPLINK = "eth0"
POD_IFACE = "eth0"
NODE_BRIDGE = "docker0"
IFNAMSIZ = 15


def state_dir(cluster: str) -> str:
    return os.path.join(STATE_ROOT, cluster)


def store_path(cluster: str) -> str:
    return os.path.join(state_dir(cluster), "state.db")


def node_dir(cluster: str, node: str) -> str:
    return os.path.join(state_dir(cluster), "nodes", node)


def pod_dir(cluster: str, namespace: str, pod: str) -> str:
    return os.path.join(state_dir(cluster), "pods", f"{namespace}_{pod}")


def fabric_ns(cluster: str) -> str:
    return f"{cluster}-fabric"


def client_ns(cluster: str) -> str:
    return f"{cluster}-client"


def lb_ns(cluster: str) -> str:
    return f"{cluster}-lb"


def node_ns(cluster: str, node: str) -> str:
    return f"{cluster}-node-{node}"


def pod_ns(cluster: str, namespace: str, pod: str) -> str:
    # "_" cannot occur in Kubernetes names, so the two parts never run together.
    if namespace == "default":
        return f"{cluster}-pod-{pod}"
    return f"{cluster}-pod-{namespace}_{pod}"


def short_hash(text: str, n: int = 7) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def pod_veth(namespace: str, pod: str, uid: str) -> str:
    """The node-side end of a pod's veth pair: "veth" + 7 hex digits, as Docker
    names them (unique per node: it hashes the pod's uid)."""
    return "veth" + short_hash(f"{namespace}/{pod}/{uid}")


def fabric_port(node: str) -> str:
    """The fabric-side end of a node's uplink: the node's name when it fits."""
    if len(node) <= IFNAMSIZ and node not in (FABRIC_BRIDGE, "client", "lb", "lo"):
        return node
    return "n-" + short_hash(node, 8)
