"""Names and places of everything a cluster owns.

Every namespace, interface, file and process of a cluster carries the cluster's
name, so that two clusters never collide and `netemu clean` removes exactly what
is its own (it reads the cluster's journal, it does not guess by pattern).

Namespace names read `<cluster>-<role>[-<rest>]` (tutorial-node-srv-k8s-node2,
tutorial-pod-nginxpod, tutorial-fabric). They are unambiguous by construction:
no `-`-separated segment of a cluster name may be a role word, so the first role
segment of a namespace name always ends the cluster's name. Without that rule,
cluster "a" with a pod named "fabric" would get "a-pod-fabric", the underlay of
cluster "a-pod".
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

# The words that follow the cluster's name in its namespace names.
ROLES = ("pod", "node", "fabric", "client", "lb")
# A namespace is a file under /run/netns: its name is at most NAME_MAX bytes.
NETNS_NAME_MAX = 255


def cluster_name_problem(cluster: str) -> str | None:
    """Why CLUSTER cannot be a cluster's name (None: it can). The loader has
    already checked the DNS-label form and the length; this is the rule that keeps
    namespace names unambiguous."""
    clashes = [seg for seg in cluster.split("-") if seg in ROLES]
    if clashes:
        return (f'its segment "{clashes[0]}" is a word netemu puts after the cluster name in '
                f"namespace names ({', '.join(ROLES)}); pick a name without it")
    return None


def cluster_of(namespace: str) -> str | None:
    """The cluster a namespace name belongs to (None: not a netemu name): the
    segments before the first role word (see the module's docstring)."""
    segments = namespace.split("-")
    for i, seg in enumerate(segments):
        if seg in ROLES:
            return "-".join(segments[:i]) if i else None
    return None


def state_dir(cluster: str) -> str:
    return os.path.join(STATE_ROOT, cluster)


def store_path(cluster: str) -> str:
    return os.path.join(state_dir(cluster), "state.db")


def node_dir(cluster: str, node: str) -> str:
    return os.path.join(state_dir(cluster), "nodes", node)


def pod_dir(cluster: str, namespace: str, pod: str) -> str:
    return os.path.join(state_dir(cluster), "pods", pod_folder(namespace, pod))


def pod_folder(namespace: str | None, pod: str) -> str:
    """The name of a pod's folder under the cluster's pods/ (pod_dir)."""
    return f"{namespace}_{pod}"


def container_log(pod_dir: str, container: str, previous: bool = False) -> str:
    """A container's log in its pod's folder. The kubelet keeps one per instance,
    as Kubernetes' does: when it restarts a container, the log of the instance
    that ended becomes the previous one (`logs --previous`)."""
    return os.path.join(pod_dir, f"{container}.previous.log" if previous else f"{container}.log")


def container_log_times(pod_dir: str, container: str, previous: bool = False) -> str:
    """When the lines of that log were written (node/logstamps.py), beside it."""
    return container_log(pod_dir, container, previous) + ".times"


def container_stdin(pod_dir: str, container: str) -> str:
    """The FIFO a container with `stdin: true` reads; `kubectl attach -i` writes
    it (and, for `stdinOnce`, leaves FIFO + ".once" behind: its first attach
    took the stdin, and its end is the container's end of input)."""
    return os.path.join(pod_dir, f"{container}.stdin")


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
        name = f"{cluster}-pod-{pod}"
    else:
        name = f"{cluster}-pod-{namespace}_{pod}"
    if len(name.encode()) <= NETNS_NAME_MAX:
        return name
    # A pod name may have 253 characters, a namespace 63: too long for a file
    # name. The cut name ends with "_" and a hash of the whole; two "_" never
    # occur in an uncut name, so a cut one cannot equal another pod's.
    tail = "_" + short_hash(f"{namespace}/{pod}", 16)
    head = f"{cluster}-pod-{namespace}_{pod}"
    return head[:NETNS_NAME_MAX - len(tail)] + tail


def short_hash(text: str, n: int = 7) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def pod_veth(namespace: str, pod: str, uid: str) -> str:
    """The node-side end of a pod's veth pair: "veth" + 7 hex digits, as Docker
    names them (unique per node: it hashes the pod's uid)."""
    return "veth" + short_hash(f"{namespace}/{pod}/{uid}")


# The label that says which machine a node runs on (a cluster over several
# machines): `kubectl get nodes -L netemu.io/machine`.
MACHINE_LABEL = "netemu.io/machine"


def machine_port(machine: str) -> str:
    """The fabric's tunnel port to another machine: "m-" and its name when that fits."""
    if len(machine) + 2 <= IFNAMSIZ:
        return "m-" + machine
    return "m-" + short_hash(machine, 8)


def fabric_port(node: str) -> str:
    """The fabric-side end of a node's uplink: the node's name when it fits."""
    if len(node) <= IFNAMSIZ and node not in (FABRIC_BRIDGE, "client", "lb", "lo"):
        return node
    return "n-" + short_hash(node, 8)
