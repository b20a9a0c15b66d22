"""A cluster's lifecycle: build it from a topology, find it, tear it down.

    up:    validate (done by the loader) -> fabric -> nodes -> external client ->
           state store (network config, nodes, workloads) -> control plane ->
           wait until ready. Any failure rolls back everything made so far.
    down:  stop the control plane (which stops what it started), then remove
           every process, namespace and file the cluster's journal names.
    clean: the same without asking anyone politely: for after a crash or kill -9.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from netemu import api, apiserver, controlplane, fabric, journal, loadbalancer, names, netns
from netemu.node import host
from netemu.overlay import leases
from netemu.store import registry
from netemu.store.sqlite import SqliteStore
from netemu.supervisor import daemon_env, python_argv

READY_TIMEOUT = 120.0
UNSCHEDULABLE_GRACE = 5.0


class ClusterError(RuntimeError):
    pass


@dataclasses.dataclass
class NodePlan:
    name: str
    address: ipaddress.IPv4Interface


def running_clusters() -> list[str]:
    try:
        return sorted(d for d in os.listdir(names.STATE_ROOT)
                      if os.path.isdir(os.path.join(names.STATE_ROOT, d)))
    except FileNotFoundError:
        return []


def resolve(name: str | None) -> str:
    """The cluster a command acts on: --cluster, $NETEMU_CLUSTER, or the only one."""
    name = name or os.environ.get(names.CLUSTER_ENV)
    clusters = running_clusters()
    if name:
        if name not in clusters:
            raise ClusterError(f'no cluster named "{name}" is running'
                               + (f" (running: {', '.join(clusters)})" if clusters else ""))
        return name
    if len(clusters) == 1:
        return clusters[0]
    if not clusters:
        raise ClusterError("no cluster is running (start one with: netemu up FILE)")
    raise ClusterError(f"several clusters are running ({', '.join(clusters)}): pick one with --cluster")


def open_store(cluster: str) -> SqliteStore:
    return SqliteStore(names.store_path(cluster))


def plan_addresses(topology) -> tuple[list[NodePlan], ipaddress.IPv4Interface]:
    """Underlay addresses: fixed ones as given, the others from the bottom up; the
    external client takes the highest address not in the load-balancer pool."""
    net = topology.settings.underlay
    reserved = {n.address for n in topology.nodes if n.address is not None}
    reserved |= set(topology.settings.lb_pool)
    client_ip = topology.settings.effective_client_address()
    reserved.add(client_ip)
    hosts = [ip for ip in net.hosts() if ip not in reserved]
    client = client_ip if client_ip is not None else hosts.pop()
    plans = []
    for n in topology.nodes:
        ip = n.address if n.address is not None else hosts.pop(0)
        plans.append(NodePlan(n.name, ipaddress.IPv4Interface(f"{ip}/{net.prefixlen}")))
    return plans, ipaddress.IPv4Interface(f"{client}/{net.prefixlen}")


def node_object(spec, address: ipaddress.IPv4Interface) -> dict:
    annotations = {}
    if spec.pod_cidr is not None:
        annotations["netemu.io/requested-pod-cidr"] = str(spec.pod_cidr)
    return {
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": {"kubernetes.io/hostname": spec.name,
                                                   "kubernetes.io/os": "linux", **spec.labels},
                     "annotations": annotations},
        "spec": {"unschedulable": bool(spec.unschedulable)},
        "status": {"addresses": [{"type": "InternalIP", "address": str(address.ip)},
                                 {"type": "Hostname", "address": spec.name}],
                   "conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady",
                                   "message": "waiting for the overlay network"}]},
    }


def backend_config(settings) -> dict:
    if settings.backend == "udp":
        return {"Type": "udp", "Port": settings.backend_port or 8285}
    if settings.backend == "vxlan":
        return {"Type": "vxlan", "VNI": settings.vni, "Port": settings.backend_port or 8472}
    return {"Type": settings.backend}


def up(topology, progress: Callable[[str], None] = lambda s: None,
       fail_after: str | None = None) -> dict:
    """Build the cluster. FAIL_AFTER names a step after which to fail on purpose
    (tests use it to prove that a failed up rolls back)."""
    cluster = topology.name
    state = names.state_dir(cluster)
    if os.path.exists(state):
        raise ClusterError(f'cluster "{cluster}" already exists (netemu down {cluster} first)')
    taken = [ns for ns in netns.list_all() if ns.startswith(f"{cluster}-")]
    os.makedirs(names.STATE_ROOT, exist_ok=True)
    os.makedirs(state)
    try:
        if taken:
            raise ClusterError(f"network namespaces named like this cluster's exist already: "
                               f"{', '.join(taken[:3])}")
        _build(topology, progress, fail_after)
        return wait_ready(cluster, progress)
    except BaseException:
        progress("rolling back")
        teardown(cluster, graceful=False)
        raise


def _build(topology, progress, fail_after) -> None:
    cluster, settings = topology.name, topology.settings
    controlplane.save_topology(topology)
    plans, client = plan_addresses(topology)
    progress(f"fabric {names.fabric_ns(cluster)}: bridge {names.FABRIC_BRIDGE} on {settings.underlay}")
    fabric.create(cluster, settings.underlay_mtu)
    for plan in plans:
        progress(f"node {plan.name}: eth0 {plan.address}")
        host.create(cluster, plan.name, plan.address, settings.underlay_mtu, client.ip)
        if settings.backend == "udp":
            fabric.disable_tso(cluster, names.fabric_port(plan.name))
        os.makedirs(names.node_dir(cluster, plan.name), exist_ok=True)
        if fail_after == "node":
            raise ClusterError("failure injected after the first node (test)")
    cns = names.client_ns(cluster)
    journal.record(cluster, "netns", cns)
    netns.create(cns)
    fabric.plug(cluster, cns, "client", client, settings.underlay_mtu)
    progress(f"external client {cns}: eth0 {client}")
    loadbalancer.create_namespace(cluster, settings.underlay_mtu)
    progress(f"cloud load balancer {names.lb_ns(cluster)}: external IPs from "
             f"{settings.lb_pool[0]}-{settings.lb_pool[-1]}" if settings.lb_pool else
             f"cloud load balancer {names.lb_ns(cluster)}: no address pool")

    store = SqliteStore(names.store_path(cluster), create=True)
    try:
        store.put(leases.CONFIG_KEY, leases.network_config(settings.cluster_network, settings.subnet_len,
                                                           backend_config(settings)))
        by_name = {n.name: n for n in topology.nodes}
        for plan in plans:
            registry.create(store, node_object(by_name[plan.name], plan.address))
        for obj in topology.objects:
            api.create_or_update(store, obj, settings)
    finally:
        store.close()
    if fail_after == "store":
        raise ClusterError("failure injected after the store was written (test)")
    apiserver.prepare(cluster)      # the API server's loopback port and kubeconfig context
    start_control_plane(cluster)
    progress("control plane started")


def start_control_plane(cluster: str) -> int:
    log_path = os.path.join(names.state_dir(cluster), "controlplane.log")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(python_argv("netemu.controlplane", cluster), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, env=daemon_env(cluster), start_new_session=True,
                                close_fds=True)
    with open(os.path.join(names.state_dir(cluster), "controlplane.pid"), "w") as f:
        f.write(str(proc.pid))
    return proc.pid


def wait_ready(cluster: str, progress, timeout: float = READY_TIMEOUT) -> dict:
    """Wait until every node is Ready and every pod has settled (running and ready,
    finished, or unschedulable). Returns a summary for printing."""
    store = open_store(cluster)
    deadline = time.monotonic() + timeout
    last = None
    nodes_ready_at = None
    try:
        while True:
            nodes = registry.list_(store, "Node")
            pods = registry.list_(store, "Pod")
            ready_nodes = [n for n in nodes if _condition(n, "Ready")]
            if len(ready_nodes) == len(nodes) and nodes_ready_at is None:
                nodes_ready_at = time.monotonic()
            # A pod the scheduler could not place counts as settled only once the
            # scheduler has had a while to retry with every node ready.
            patient = nodes_ready_at is not None and time.monotonic() - nodes_ready_at > UNSCHEDULABLE_GRACE
            settled = [p for p in pods if _settled(p, patient)]
            line = f"nodes ready {len(ready_nodes)}/{len(nodes)}, pods settled {len(settled)}/{len(pods)}"
            if line != last:
                progress(line)
                last = line
            if len(ready_nodes) == len(nodes) and len(settled) == len(pods) and _controllers_done(store):
                return {"nodes": nodes, "pods": pods}
            if not _control_plane_alive(cluster):
                raise ClusterError(f"the control plane died; see {names.state_dir(cluster)}/controlplane.log")
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster not ready after {timeout:.0f} s ({line})" + _diagnosis(cluster))
            time.sleep(0.1)
    finally:
        store.close()


def wait_node_ready(store, name: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        node = registry.get(store, "Node", None, name)
        if node is not None and _condition(node, "Ready"):
            return node
        if time.monotonic() > deadline:
            raise ClusterError(f"node {name} not ready after {timeout:.0f} s")
        time.sleep(0.05)


def _diagnosis(cluster: str) -> str:
    """The last error a daemon logged, so a failed up says why (its logs go with
    the rollback)."""
    logs = [os.path.join(names.state_dir(cluster), "controlplane.log")]
    nodes_dir = os.path.join(names.state_dir(cluster), "nodes")
    for node in sorted(os.listdir(nodes_dir)) if os.path.isdir(nodes_dir) else []:
        logs += [os.path.join(nodes_dir, node, f"{d}.log") for d in ("overlay", "proxy")]
    for path in logs:
        try:
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            continue
        errors = [l for l in lines if l and not l.startswith((" ", "Traceback")) and
                  ("Error" in l or "ERROR" in l or "Exception" in l)]
        if errors:
            return f"; {os.path.relpath(path, names.state_dir(cluster))}: {errors[-1].strip()[:300]}"
    return ""


def _controllers_done(store) -> bool:
    """Every replica controller has made its pods (so up returns with them)."""
    for kind in ("ReplicationController", "ReplicaSet", "DaemonSet", "Job"):
        for obj in registry.list_(store, kind):
            if "observedGeneration" not in obj.get("status", {}) and kind != "Job":
                return False
            if kind == "Job" and not obj.get("status", {}).get("startTime"):
                return False
    return True


def _condition(obj: dict, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in obj.get("status", {}).get("conditions", []))


def _settled(pod: dict, unschedulable_counts: bool) -> bool:
    status = pod.get("status", {})
    phase = status.get("phase")
    if phase in ("Succeeded", "Failed"):
        return True
    if phase == "Running" and (_condition(pod, "Ready") or _restarting(pod)):
        return True
    return unschedulable_counts and any(c.get("type") == "PodScheduled" and c.get("status") == "False"
                                        for c in status.get("conditions", []))


def _restarting(pod: dict) -> bool:
    return any("waiting" in c.get("state", {}) or c.get("restartCount", 0) > 0
               for c in pod.get("status", {}).get("containerStatuses", []))


def _control_plane_alive(cluster: str) -> bool:
    pid = _read_pid(cluster)
    return pid is not None and _alive(pid)


def _read_pid(cluster: str) -> int | None:
    try:
        with open(os.path.join(names.state_dir(cluster), "controlplane.pid")) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# -- teardown ------------------------------------------------------------------

def namespace_inodes(cluster: str) -> set[int]:
    """The inodes of the cluster's network namespaces that exist now."""
    return {netns.inode(ns) for kind, ns in journal.entries(cluster) if kind == "netns"} - {None}


def cluster_processes(cluster: str, own: set[int] | None = None) -> list[int]:
    """Every process of the cluster: tagged with its name in the environment, or
    living in one of its network namespaces (OWN: their inodes, if taken
    earlier; a namespace already deleted by its pod still holds its processes)."""
    own = (own or set()) | namespace_inodes(cluster)
    tag = f"{names.CLUSTER_ENV}={cluster}".encode()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            if tag in env:
                pids.append(pid)
                continue
            if own and os.stat(f"/proc/{pid}/ns/net").st_ino in own:
                pids.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def teardown(cluster: str, graceful: bool = True) -> None:
    """Remove every process, namespace and file of CLUSTER (idempotent).

    Also processes started by hand in its namespaces (`ip netns exec`): the
    namespaces are noted first, because a graceful stop deletes the pods' own."""
    own = namespace_inodes(cluster)
    pid = _read_pid(cluster)
    if graceful and pid is not None and _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    for _ in range(5):
        pids = cluster_processes(cluster, own)
        if not pids:
            break
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.1)
    errors = []
    for kind, name in reversed(journal.entries(cluster)):
        if kind == "netns":
            try:
                netns.delete(name)
            except netns.NetnsError as e:
                errors.append(str(e))
    apiserver.forget(cluster)       # the kubeconfig context up added
    shutil.rmtree(names.state_dir(cluster), ignore_errors=True)
    if errors:
        raise ClusterError("; ".join(errors))


def require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError("netemu builds network namespaces and must run as root (try: sudo netemu ...)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the netemu command")


# -- nodes joining and leaving a running cluster ----------------------------------

def add_node(cluster: str, name: str, labels: dict | None = None, address: str | None = None,
             pod_cidr: str | None = None, unschedulable: bool = False) -> ipaddress.IPv4Interface:
    """Build a new node and register it; the control plane starts its kubelet and
    overlay daemon, which leases a subnet like any other node's."""
    from netemu.topology.model import NodeSpec

    topology = controlplane.load_topology(cluster)
    settings = topology.settings
    if any(n.name == name for n in topology.nodes):
        raise ClusterError(f'node "{name}" already exists')
    if not _dns_label(name):
        raise ClusterError(f'node name "{name}": must be a lowercase DNS label (a-z, 0-9, "-")')
    store = open_store(cluster)
    try:
        used = {ipaddress.IPv4Address(a["address"]) for n in registry.list_(store, "Node")
                for a in n["status"]["addresses"] if a["type"] == "InternalIP"}
        used |= set(settings.lb_pool)
        used.add(settings.effective_client_address())
        if address is not None:
            ip = ipaddress.IPv4Address(address)
            if ip not in settings.underlay or ip in used:
                raise ClusterError(f"address {ip} is outside {settings.underlay} or already in use")
        else:
            free = [ip for ip in settings.underlay.hosts() if ip not in used]
            if not free:
                raise ClusterError(f"no free address left on the underlay {settings.underlay}")
            ip = free[0]
        iface = ipaddress.IPv4Interface(f"{ip}/{settings.underlay.prefixlen}")
        spec = NodeSpec(name=name, labels=dict(labels or {}), address=ip,
                        pod_cidr=ipaddress.IPv4Network(pod_cidr) if pod_cidr else None,
                        unschedulable=unschedulable)
        try:
            host.create(cluster, name, iface, settings.underlay_mtu,
                        settings.effective_client_address())
            if settings.backend == "udp":
                fabric.disable_tso(cluster, names.fabric_port(name))
        except BaseException:
            netns.delete(names.node_ns(cluster, name))
            raise
        os.makedirs(names.node_dir(cluster, name), exist_ok=True)
        topology.nodes.append(spec)
        controlplane.save_topology(topology)
        registry.create(store, node_object(spec, iface))
        return iface
    finally:
        store.close()


def remove_node(cluster: str, name: str, timeout: float = 30.0) -> None:
    """Drain a node (its pods go), release its lease, and remove its namespace."""
    topology = controlplane.load_topology(cluster)
    store = open_store(cluster)
    try:
        if registry.get(store, "Node", None, name) is None:
            raise ClusterError(f'nodes "{name}" not found')
        # Cordon first, so the scheduler places nothing new there.
        registry.mutate(store, "Node", None, name, lambda n: n["spec"].update(unschedulable=True))
        for pod in registry.list_(store, "Pod"):
            if pod.get("spec", {}).get("nodeName") == name:
                registry.mutate(store, "Pod", pod["metadata"]["namespace"], pod["metadata"]["name"],
                                lambda p: p["metadata"].setdefault("deletionTimestamp", registry.now()))
        deadline = time.monotonic() + timeout
        while any(p.get("spec", {}).get("nodeName") == name for p in registry.list_(store, "Pod")):
            if time.monotonic() > deadline:
                raise ClusterError(f"pods on node {name} did not stop within {timeout:.0f} s")
            time.sleep(0.1)
        for lease in leases.read_leases(store):
            if lease.node == name:
                leases.release(store, lease)
        registry.delete(store, "Node", None, name)
    finally:
        store.close()
    # The control plane stops the node's daemons when its object goes; wait for them.
    node_namespace = names.node_ns(cluster, name)
    inode = netns.inode(node_namespace)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and inode is not None and _processes_in(inode):
        time.sleep(0.05)
    netns.delete(node_namespace)
    shutil.rmtree(names.node_dir(cluster, name), ignore_errors=True)
    topology.nodes = [n for n in topology.nodes if n.name != name]
    controlplane.save_topology(topology)


def _processes_in(inode: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                    out.append(int(entry))
            except (FileNotFoundError, PermissionError):
                continue
    return out


def _dns_label(name: str) -> bool:
    import re
    return bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name))
