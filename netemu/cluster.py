"""A cluster's lifecycle: build it from a topology, find it, tear it down.

    up:    validate (done by the loader) -> control plane supervisor (waiting) ->
           fabric -> nodes -> external client -> state store (network config,
           nodes, workloads) -> control plane started -> wait until ready. Any
           failure, and any signal, rolls back everything made so far.
    down:  stop the control plane (which stops what it started), then remove
           every process, namespace and file the cluster's journal names.
    clean: the same without asking anyone politely: for after a crash or kill -9.

Ownership is by the journal, never by a name pattern or an environment
variable (see cluster_processes and journal.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from netemu import api, apiserver, clusterconfig, fabric, journal, loadbalancer, machines, names, netns
from netemu.node import host
from netemu.overlay import leases
import netemu.store as store_module
from netemu.store import etcdrun
from netemu.store import open_store as store_of
from netemu.store import registry
from netemu.store.base import Compacted
from netemu.supervisor import daemon_env, python_argv

READY_TIMEOUT = 120.0
SILENT_WARNING = 5.0     # a control plane part that has not ticked for this long is said to hang
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


def open_store(cluster: str):
    return store_of(cluster)


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
        annotations[leases.REQUESTED_POD_CIDR] = str(spec.pod_cidr)
    return {
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": {"kubernetes.io/hostname": spec.name,
                                                   "kubernetes.io/os": "linux", **spec.labels,
                                                   **({names.MACHINE_LABEL: spec.machine}
                                                      if spec.machine else {})},
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


def check_name(cluster: str, where: str = "name") -> None:
    """The rule that keeps namespace names unambiguous (see names.py)."""
    problem = names.cluster_name_problem(cluster)
    if problem:
        raise ClusterError(f'{where}: invalid cluster name "{cluster}": {problem}')


def owned_names_taken(cluster: str) -> list[str]:
    """Namespaces under /run/netns whose name says they are CLUSTER's (exact
    parse of the name, not a prefix: cluster "a" does not own "a-b-node-x")."""
    return [ns for ns in netns.list_all() if names.cluster_of(ns) == cluster]


GC_THRESH3 = "/proc/sys/net/ipv4/neigh/default/gc_thresh3"


def neighbour_entries(nodes: int) -> int:
    """The most dynamic (ARP-learnt) neighbour entries a cluster of NODES nodes
    can make: every node's eth0 may learn every other node, the external
    client and the load balancer; those two may learn every node. Pods make
    none: their entries, and docker0's for them, are PERMANENT (see
    node.sandbox.create_network), which the kernel does not count."""
    return nodes * (nodes + 1) + 2 * nodes


def neighbour_table_warning(nodes: int, path: str = GC_THRESH3) -> str | None:
    """A warning when NODES nodes may need more dynamic neighbour entries than
    the machine's table allows (gc_thresh3: one limit for all namespaces
    together, set only in the machine's own namespace, which netemu never
    changes). None when they fit or the limit cannot be read."""
    try:
        with open(path) as f:
            limit = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    need = neighbour_entries(nodes)
    if need <= limit:
        return None
    suggest = -(-(need + 1024) // 1024) * 1024
    return (f"{nodes} nodes may need up to {need} ARP entries on the underlay (every node talking to every "
            f"other), more than this machine's neighbour table allows for all namespaces together "
            f"(net.ipv4.neigh.default.gc_thresh3 = {limit}); beyond it the kernel drops packets "
            f"(\"neighbour table overflow\"). netemu does not change it; to raise it: "
            f"sysctl -w net.ipv4.neigh.default.gc_thresh3={suggest}")


def up(topology, progress: Callable[[str], None] = lambda s: None,
       fail_after: str | None = None, where: str | None = None, kubeconfig: bool = True,
       store: str | None = None) -> dict:
    """Build the cluster. FAIL_AFTER names a step after which to fail on purpose
    (tests use it to prove that a failed up rolls back). WHERE: the file and
    field the cluster's name came from, for errors. KUBECONFIG: add the
    cluster's context to the user's kubeconfig (not for throw-away clusters
    such as the benchmark's, which must leave the user's files alone).
    STORE: etcd://HOST:PORT, an etcd to keep the cluster's state in (under
    /netemu/<cluster>) instead of the SQLite file in its state folder. A
    cluster over several machines given none starts its own, on the first
    machine's address (etcdrun.start_owned), for the other machines to join.

    Every way up can end early rolls back: an exception (SIGINT's
    KeyboardInterrupt, and SIGTERM/SIGHUP, which the CLI turns into
    exceptions, see cli.cmd_up) rolls back here; if this process dies without
    a word (SIGKILL), the control plane's supervisor sees its end of the
    builder pipe close before the commit and rolls back itself."""
    cluster = topology.name
    check_name(cluster, where or f"{getattr(topology, 'source', '') or cluster}: name")
    if topology.machines:
        try:
            machines.check_here(topology, topology.machines[0])
        except machines.MachineError as e:
            raise ClusterError(f"{e} (netemu up runs on the first of machines:, netemu join on the "
                               "others)") from None
    building = _claim(cluster)
    builder = None
    try:
        if topology.machines and not store:
            first = topology.machines[0]
            try:
                store = etcdrun.start_owned(cluster, str(first.address))
            except etcdrun.EtcdStartError as e:
                raise ClusterError(f"machines: {e}") from None
            progress(f"etcd started on machine {first.name}: {store} (data and log in "
                     f"{etcdrun.owned_dir(cluster)}), for the other machines to join")
        if store:
            try:
                store_module.use_etcd(cluster, store).close()
            except ValueError as e:
                raise ClusterError(str(e)) from None
            progress(f"state store: {store_module.describe(cluster)}")
        if topology.machines:
            machines.write_info(cluster, topology.machines[0].name, first=True)
        _create_store(topology)
        # Next: the supervisor, holding the read end of the builder pipe,
        # so that from here on a builder killed by SIGKILL is rolled back.
        builder = start_supervisor(cluster)
        _build(topology, progress, fail_after, builder, kubeconfig)
        summary = wait_ready(cluster, progress, machine=machines.name(cluster))
        summary["waiting"] = _not_joined(cluster, topology, store)
        _tell(builder, "commit")
        builder.close()
        return summary
    except BaseException:
        # A second SIGTERM/SIGHUP must not cut the rollback short.
        with _signals_deferred():
            progress("rolling back")
            teardown(cluster, graceful=False)
        raise
    finally:
        os.close(building)


def _claim(cluster: str) -> int:
    """Make CLUSTER's state folder, which must not exist, and return an open
    descriptor of it, locked: held while up (or join) builds, so that another
    up of the same name does not take this half-built cluster for a stillborn
    one."""
    state = names.state_dir(cluster)
    os.makedirs(names.STATE_ROOT, exist_ok=True)
    with _root_lock():
        if os.path.exists(state) and not _remove_if_stillborn(cluster):
            raise ClusterError(f'cluster "{cluster}" already exists (netemu down {cluster} first)')
        taken = owned_names_taken(cluster)
        if taken:
            raise ClusterError(f"network namespaces named like this cluster's exist already: "
                               f"{', '.join(taken[:3])}")
        os.makedirs(state)
        building = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(building, fcntl.LOCK_EX)
    return building


def join(cluster: str | None, endpoint: str, machine: str,
         progress: Callable[[str], None] = lambda s: None) -> dict:
    """`netemu join`: build MACHINE's part of CLUSTER, which `netemu up` brought
    up on the first machine with its state in the etcd at ENDPOINT (CLUSTER
    None: the only cluster that etcd holds): the fabric with its tunnels to the
    other machines, this machine's nodes, and the supervisor of their agents.
    Waits until those nodes are Ready and their pods settled; a failure, or a
    signal, removes what it made (and nothing of the other machines')."""
    config_key = registry.key("ConfigMap", clusterconfig.NAMESPACE, clusterconfig.NAME)
    try:
        if cluster is None:
            found = store_module.clusters_in_etcd(endpoint, config_key)
            if len(found) != 1:
                raise ClusterError(f"--store {endpoint}: " + (
                    "holds no netemu cluster" if not found else
                    f"holds several clusters ({', '.join(found)}): pick one with --cluster"))
            cluster = found[0]
        check_name(cluster, "--cluster")
        from netemu.store.etcd import EtcdError, EtcdStore, parse_endpoint
        host, port = parse_endpoint(endpoint)
        try:
            store = EtcdStore(f"{host}:{port}", namespace=store_module.etcd_namespace(cluster))
        except EtcdError as e:
            raise ClusterError(f"--store {endpoint}: {e}") from None
    except ValueError as e:
        raise ClusterError(str(e)) from None
    try:
        try:
            topology = clusterconfig.read(cluster, store)
        except clusterconfig.ClusterConfigError:
            raise ClusterError(f'--store {endpoint}: no cluster "{cluster}" there (no {clusterconfig.DISPLAY} '
                               f"under {store_module.etcd_namespace(cluster)})") from None
        where = f'cluster "{cluster}"'
        if not topology.machines:
            raise ClusterError(f"{where} runs on one machine (its topology has no machines:)")
        known = [m.name for m in topology.machines]
        if machine not in known:
            raise ClusterError(f'--machine: {where} has no machine "{machine}" (machines: {", ".join(known)})')
        if machine == known[0]:
            raise ClusterError(f'--machine: "{machine}" is the first machine of {where}: netemu up runs '
                               "there, not join")
        resuming = _left_behind(cluster, machine)
        if machine in machines.present(store) and not resuming:
            raise ClusterError(f'--machine: machine "{machine}" has joined {where} already (its key '
                               f"{machines.key(machine)} is alive)")
        try:
            machines.check_here(topology, topology.machine(machine))
        except machines.MachineError as e:
            raise ClusterError(str(e)) from None
        nodes = [n for n in registry.list_(store, "Node")
                 if n["metadata"].get("labels", {}).get(names.MACHINE_LABEL) == machine]
    finally:
        store.close()
    plans = []
    for n in nodes:
        address = next((a["address"] for a in n.get("status", {}).get("addresses", [])
                        if a.get("type") == "InternalIP"), None)
        plans.append(NodePlan(n["metadata"]["name"], ipaddress.IPv4Interface(
            f"{address}/{topology.settings.underlay.prefixlen}")))
    if resuming:
        # This machine's netemu died (SIGKILL, a crash) and left its part: the
        # namespaces and files of the cluster here. Removed, then built again
        # from the store: the Node objects and the flannel leases (24 h, held
        # for each node's address) are kept, so each node keeps its subnet.
        progress(f'machine {machine}: its earlier part of cluster "{cluster}" is not running; '
                 "removing it and joining again (nodes and subnets kept)")
        teardown(cluster, graceful=False, forget_store=False)
    building = _claim(cluster)
    builder = None
    try:
        store_module.join_etcd(cluster, endpoint).close()
        machines.write_info(cluster, machine, first=False)
        progress(f"state store: {store_module.describe(cluster)}")
        builder = start_supervisor(cluster)
        _build_machine(topology, machine, plans, topology.settings.effective_client_address(), progress)
        _tell(builder, "start")
        progress(f"agents of {len(plans)} node(s) started")
        summary = wait_ready(cluster, progress, machine=machine)
        _tell(builder, "commit")
        builder.close()
        return {**summary, "cluster": cluster}
    except BaseException:
        with _signals_deferred():
            progress("rolling back")
            teardown(cluster, graceful=False)
        raise
    finally:
        os.close(building)


def _left_behind(cluster: str, machine: str) -> bool:
    """Whether this machine holds a part of CLUSTER, as MACHINE, that nothing
    runs any more: its state folder, no living supervisor, no join or up
    building it."""
    state = names.state_dir(cluster)
    try:
        if (machines.info(cluster) or {}).get("name") != machine or _control_plane_alive(cluster):
            return False
        fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, machines.MachineError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False            # being built right now
    finally:
        os.close(fd)


def _not_joined(cluster: str, topology, endpoint: str | None) -> list[tuple[str, list[str], str]]:
    """(machine, its nodes, the command that joins it) for each other machine
    that has not joined yet."""
    if not topology.machines:
        return []
    store = open_store(cluster)
    try:
        present = set(machines.present(store))
    finally:
        store.close()
    return [(m.name, [n.name for n in topology.nodes_on(m.name)],
             f"netemu join --store {endpoint} --machine {m.name} --cluster {cluster}")
            for m in topology.machines[1:] if m.name not in present]


DOWN_WAIT = 30.0        # seconds `down` waits for the other machines to say they are done


def take_down(cluster: str, progress: Callable[[str], None] = lambda s: None) -> None:
    """`netemu down`: this machine's part of CLUSTER, and, on a cluster over
    several machines, every other machine's: without its settings in the store
    the cluster is gone, which each machine's supervisor notices and removes
    its part (see controlplane.Supervisor); down waits until their keys are
    gone (at most DOWN_WAIT) and then removes the cluster's keys."""
    me = machines.name(cluster)
    if me is None:
        teardown(cluster, graceful=True)
        return
    # The etcd this machine runs for the cluster goes last: the other
    # machines use it until they are done.
    owns_etcd = etcdrun.owned(cluster) is not None
    store = open_store(cluster)
    try:
        teardown(cluster, graceful=True, forget_store=False, keep_etcd=owns_etcd)
        store.delete(registry.key("ConfigMap", clusterconfig.NAMESPACE, clusterconfig.NAME))
        deadline = time.monotonic() + DOWN_WAIT
        others = [m for m in machines.present(store) if m != me]
        if others:
            progress(f"waiting for machine(s) {', '.join(others)} to remove their part")
        while others and time.monotonic() < deadline:
            time.sleep(0.2)
            others = [m for m in machines.present(store) if m != me]
        store.delete_prefix("")
    finally:
        store.close()
        if owns_etcd:
            remove_etcd(cluster)
    if others:
        raise ClusterError(f"machine(s) {', '.join(others)} did not say within {DOWN_WAIT:.0f} s that they "
                           f"had removed their part: run netemu clean {cluster} there")


def remove_etcd(cluster: str) -> None:
    """Stop the etcd CLUSTER runs on this machine and remove what is left of
    its state folder (teardown with keep_etcd left the etcd's part)."""
    etcdrun.stop_owned(cluster)
    shutil.rmtree(names.state_dir(cluster), ignore_errors=True)


def wait_store_emptied(store, timeout: float) -> bool:
    """On the machine whose etcd holds the cluster, taken down from another
    machine: wait until that `down` deleted the cluster's keys (its last
    step), TIMEOUT at most. True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):        # noqa: BLE001 - etcd busy: look again
            if not store.keys(""):
                return True
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def _root_lock():
    """Serialises the start of `up`s (the check for a name and the claim of it)."""
    fd = os.open(os.path.join(names.STATE_ROOT, ".up.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_if_stillborn(cluster: str) -> bool:
    """An up killed (SIGKILL) before it started the supervisor leaves a state
    folder and nothing else: no up building it (its lock is free), no process,
    no namespace. Remove that folder; True if so."""
    state = names.state_dir(cluster)
    try:
        fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False        # an up is building it
        if any(netns.inode(name) == ino for name, ino in journal.namespaces(cluster)):
            return False
        if _control_plane_alive(cluster) or cluster_processes(cluster):
            return False
        shutil.rmtree(state, ignore_errors=True)
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred():
    """Ignore SIGINT, SIGTERM and SIGHUP during the body (in the main thread
    only: elsewhere signals cannot be set, nor are they delivered)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _tell(builder, word: str) -> None:
    builder.write(f"{word}\n".encode())
    builder.flush()


def _build(topology, progress, fail_after, builder, kubeconfig: bool = True) -> None:
    cluster, settings = topology.name, topology.settings
    plans, client = plan_addresses(topology)
    here = machines.name(cluster)
    local = {n.name for n in topology.nodes_on(here)}
    _build_machine(topology, here, [p for p in plans if p.name in local], client.ip, progress, fail_after)
    cns = names.client_ns(cluster)
    journal.create_netns(cluster, cns)
    fabric.plug(cluster, cns, "client", client, settings.underlay_mtu)
    progress(f"external client {cns}: eth0 {client}")
    loadbalancer.create_namespace(cluster, settings.underlay_mtu)
    progress(f"cloud load balancer {names.lb_ns(cluster)}: external IPs from "
             f"{settings.lb_pool[0]}-{settings.lb_pool[-1]}" if settings.lb_pool else
             f"cloud load balancer {names.lb_ns(cluster)}: no address pool")

    store = store_of(cluster)
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
    apiserver.prepare(cluster, kubeconfig)      # the API server's loopback port and kubeconfig context
    _tell(builder, "start")
    progress("control plane started")


def _build_machine(topology, here: str | None, plans: list[NodePlan], gateway: ipaddress.IPv4Address,
                   progress, fail_after: str | None = None) -> None:
    """This machine's part of the cluster: the fabric (with its tunnels to the
    other machines, if any) and the nodes PLANS."""
    cluster, settings = topology.name, topology.settings
    progress(f"fabric {names.fabric_ns(cluster)}: bridge {names.FABRIC_BRIDGE} on {settings.underlay}"
             + (f" (machine {here}, MTU {settings.underlay_mtu})" if here else ""))
    fabric.create(cluster, settings.underlay_mtu)
    if here is not None:
        try:
            machines.create_tunnels(cluster, topology, here, progress)
        except machines.MachineError as e:
            raise ClusterError(str(e)) from None
    specs = {n.name: n for n in topology.nodes}
    for plan in plans:
        progress(f"node {plan.name}: eth0 {plan.address}")
        host.create(cluster, plan.name, plan.address, settings.underlay_mtu, gateway,
                    tso=settings.backend != "udp", impairment=specs[plan.name].uplink(settings))
        os.makedirs(names.node_dir(cluster, plan.name), exist_ok=True)
        if fail_after == "node":
            raise ClusterError("failure injected after the first node (test)")


def _create_store(topology) -> None:
    """The cluster's store, with what kube-apiserver makes at its start (the
    system namespaces) and the cluster's settings (the ConfigMap
    kube-system/netemu-cluster): every process of the cluster reads its
    settings from there (clusterconfig.read), the supervisor first."""
    from netemu.apiserver.server import ensure_system_namespaces

    store = store_of(topology.name, create=True)
    try:
        ensure_system_namespaces(store)
        clusterconfig.create(store, topology)
    finally:
        store.close()


def start_supervisor(cluster: str):
    """Start the control plane's supervisor (detached, in a session of its own,
    which every root-namespace process of the control plane shares) and return
    the write end of its builder pipe (its stdin): "start" starts the control
    plane, "commit" ends up; the pipe closing before "commit" rolls back."""
    log_path = os.path.join(names.state_dir(cluster), "controlplane.log")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(python_argv("netemu.controlplane", cluster), stdin=subprocess.PIPE,
                                stdout=out, stderr=out, env=daemon_env(cluster), start_new_session=True,
                                close_fds=True)
    # The supervisor journals itself too; this covers a supervisor killed before
    # it got that far.
    journal.record_process(cluster, proc.pid)
    with open(os.path.join(names.state_dir(cluster), "controlplane.pid"), "w") as f:
        f.write(str(proc.pid))
    return proc.stdin


def wait_ready(cluster: str, progress, timeout: float | None = None, machine: str | None = None) -> dict:
    """Wait until every node is Ready and every pod has settled (running and ready,
    finished, or unschedulable), at most TIMEOUT (default READY_TIMEOUT, read
    at the call: the benchmark raises it). Returns a summary for printing.

    MACHINE (a cluster over several machines): only that machine's nodes, and
    the pods bound to them (and, on the first machine, which runs the
    scheduler, the pods not bound yet): the other machines' nodes are Ready
    once those machines have joined."""
    timeout = READY_TIMEOUT if timeout is None else timeout
    store = open_store(cluster)
    deadline = time.monotonic() + timeout
    last = None
    nodes_ready_at = None
    unbound_too = machine is None or machines.runs_control_plane(cluster)
    followed = {kind: _Followed(store, kind) for kind in ("Node", "Pod")}
    try:
        while True:
            nodes, pods = (followed[kind].refresh() for kind in ("Node", "Pod"))
            if machine is not None:
                nodes = [n for n in nodes if n["metadata"].get("labels", {}).get(names.MACHINE_LABEL) == machine]
                here = {n["metadata"]["name"] for n in nodes}
                pods = [p for p in pods if p.get("spec", {}).get("nodeName") in here
                        or (unbound_too and not p.get("spec", {}).get("nodeName"))]
            ready_nodes = [n for n in nodes if _condition(n, "Ready")]
            if len(ready_nodes) == len(nodes) and nodes_ready_at is None:
                nodes_ready_at = time.monotonic()
            # A pod the scheduler could not place counts as settled only once the
            # scheduler has had a while to retry with every node ready.
            patient = nodes_ready_at is not None and time.monotonic() - nodes_ready_at > UNSCHEDULABLE_GRACE
            settled = [p for p in pods if _settled(p, patient)]
            line = f"nodes ready {len(ready_nodes)}/{len(nodes)}, pods settled {len(settled)}/{len(pods)}"
            done = len(ready_nodes) == len(nodes) and len(settled) == len(pods) and _controllers_done(store)
            late: list[str] = []
            if done:
                late = _data_path_late(cluster, store, nodes)
                line += f", data path in place {len(nodes) - len(late)}/{len(nodes)}"
                done = not late
            if line != last:
                progress(line)
                last = line
            if done:
                return {"nodes": nodes, "pods": pods}
            if not _control_plane_alive(cluster):
                raise ClusterError(f"the control plane died; see {names.state_dir(cluster)}/controlplane.log")
            if time.monotonic() > deadline:
                waiting = f"; not in place: {', '.join(late[:5])}{' ...' if len(late) > 5 else ''}" if late else ""
                raise ClusterError(f"cluster not ready after {timeout:.0f} s ({line}){waiting}"
                                   + _diagnosis(cluster))
            time.sleep(0.1)
    finally:
        store.close()


class _Followed:
    """The objects of one kind, kept up to date from the store's change log:
    each look of wait_ready decodes what changed since the one before, not
    every object (at 1,000 pods, decoding them all ten times a second took
    about a core for the whole of `up`, beside the cluster it waited for)."""

    def __init__(self, store, kind: str):
        self.store, self.prefix = store, registry.prefix(kind)
        self.revision = -1
        self.objects: dict[str, dict] = {}

    def refresh(self) -> list[dict]:
        """Every object of the kind now, in key order."""
        if self.revision < 0:
            self._list()
        else:
            try:
                events = self.store.events_since(self.revision, self.prefix)
            except Compacted:
                self._list()
            else:
                for ev in events:
                    if ev.type == "PUT":
                        self.objects[ev.key] = registry.with_version(ev.value, ev.revision)
                    else:
                        self.objects.pop(ev.key, None)
                    self.revision = max(self.revision, ev.revision)
        return [self.objects[k] for k in sorted(self.objects)]

    def _list(self) -> None:
        # The revision first: a write after it and before the list is in both,
        # and the events read next put it (or its deletion) again.
        self.revision = self.store.revision()
        self.objects = {kv.key: registry.with_version(kv.value, kv.mod_revision)
                        for kv in self.store.list(self.prefix)}


def _data_path_late(cluster: str, store, nodes: list[dict]) -> list[str]:
    """The nodes whose overlay or proxy does not hold the store's newest lease,
    Service or Endpoints yet (node.synced), as 'node (part, ...)'."""
    from netemu.node import synced
    from netemu.overlay import leases

    def newest(prefix: str) -> int:
        return max((kv.mod_revision for kv in store.list(prefix)), default=0)

    wanted = {"overlay": {leases.SUBNETS: newest(leases.SUBNETS)},
              "proxy": {p: newest(p) for p in (registry.prefix("Service"), registry.prefix("Endpoints"))}}
    late = []
    for node in nodes:
        parts = synced.lagging(cluster, node["metadata"]["name"], wanted)
        if parts:
            late.append(f"{node['metadata']['name']} ({', '.join(parts)})")
    return late


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
        logs += [os.path.join(nodes_dir, node, f"{d}.log") for d in ("agent", "overlay", "proxy", "kubelet")]
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
    return pid is not None and journal.running(pid)


def control_plane_problem(cluster: str) -> tuple[str, bool] | None:
    """What is wrong with CLUSTER's control plane, as (one line, fatal) — fatal
    when nothing runs that would act on a change; None when it runs supervised
    (a part being restarted counts as running: its supervisor brings it back)."""
    from netemu.controlplane import PARTS, part_alive_path, part_pid_path

    state_dir = names.state_dir(cluster)
    supervisor = _read_pid(cluster)
    sup_state = _state(supervisor) if supervisor else None
    parts = [p for p in PARTS if _alive_pid_file(part_pid_path(cluster, p))]
    if sup_state is not None and sup_state not in "TtZX":
        for part in parts:
            with contextlib.suppress(FileNotFoundError):
                silent = time.time() - os.stat(part_alive_path(cluster, part)).st_mtime
                if silent > SILENT_WARNING:
                    return (f'the control plane of cluster "{cluster}" is not responding (its {part} part '
                            f"has been silent for {silent:.0f} s; its supervisor restarts it if it stays so)",
                            False)
        return None
    why = "its supervisor is stopped (SIGSTOP)" if sup_state in ("T", "t") else "its supervisor is gone"
    if parts:
        return (f'the control plane of cluster "{cluster}" runs unsupervised ({why}): a part that dies '
                f"will not be restarted", False)
    return (f'the control plane of cluster "{cluster}" is not running ({why}): nothing will act on '
            f"changes; see {state_dir}/controlplane.log, then netemu down {cluster}", True)


def _state(pid: int) -> str | None:
    st = journal.process_stat(pid)
    return st[0] if st else None


def _alive_pid_file(path: str) -> bool:
    try:
        with open(path) as f:
            return journal.running(int(f.read()))
    except (FileNotFoundError, ValueError):
        return False


def check_control_plane(cluster: str, writes: bool, warn: Callable[[str], None]) -> None:
    """Before a command: refuse a change nobody would act on (WRITES), else warn."""
    problem = control_plane_problem(cluster)
    if problem is None:
        return
    line, fatal = problem
    if fatal and writes:
        raise ClusterError(line)
    warn(line)


def _read_pid(cluster: str) -> int | None:
    try:
        with open(os.path.join(names.state_dir(cluster), "controlplane.pid")) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return None


# -- teardown ------------------------------------------------------------------

def namespace_inodes(cluster: str) -> set[int]:
    """The inodes of the cluster's network namespaces that exist now: journalled
    when made, and still under that name. Not those of namespaces deleted since:
    once a namespace is freed the kernel may give its inode number to a new one,
    perhaps another cluster's (teardown notes its inodes before a graceful stop
    deletes the pods' namespaces, for processes still inside them)."""
    return {ino for name, ino in journal.namespaces(cluster) if netns.inode(name) == ino}


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def protected_pids() -> set[int]:
    """This process and its ancestors: never the cluster's to kill, whatever
    namespace or session they are in (`ip netns exec NODE bash`, then
    `netemu down` from that shell)."""
    out, pid = set(), os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        pid = _parent(pid)
    return out


def cluster_processes(cluster: str, own: set[int] | None = None) -> list[int]:
    """Every live process of the cluster, found by what its journal says it made:

      - processes in one of its network namespaces, by inode (OWN: more inodes,
        noted earlier); this finds pods, node daemons, and commands started by
        hand with `ip netns exec`;
      - processes in the session of a session leader it started (the control
        plane's supervisor and its parts), known by pid and start time.

    Never this process or its ancestors. Not "anything carrying NETEMU_CLUSTER":
    the user's own shell may well have exported it."""
    own = (own or set()) | namespace_inodes(cluster)
    leaders = {}
    for pid, start in journal.processes(cluster):
        now = journal.process_stat(pid)
        # A live process with the leader's pid but another start time leads
        # someone else's session: the pid was re-used.
        if now is None or now[2] == start:
            leaders[pid] = start
    protected = protected_pids()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in protected:
            continue
        pid = int(entry)
        st = journal.process_stat(pid)
        if st is None or st[0] in "ZX":
            continue
        state, sid, start = st
        # A session id outlives its leader, and the kernel does not hand out a
        # pid still used as a session id; the start time rules out a session of
        # the same number begun before the leader we recorded.
        if sid in leaders and start >= leaders[sid]:
            pids.append(pid)
            continue
        try:
            if own and os.stat(f"/proc/{pid}/ns/net").st_ino in own:
                pids.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def teardown(cluster: str, graceful: bool = True, forget_store: bool | None = None,
             keep_etcd: bool = False) -> None:
    """Remove every process, namespace and file of CLUSTER (idempotent).

    Also processes started by hand in its namespaces (`ip netns exec`).
    Namespaces are deleted only while their name still leads to the inode the
    journal recorded: a name another cluster (or anyone) holds is left alone.
    FORGET_STORE: also delete the cluster's keys from its etcd (default: on the
    machine that runs its control plane; a joined machine removes its own part
    only, and its key). The etcd the cluster runs on this machine, if it does
    (etcdrun.start_owned), is stopped with everything else, its data with the
    state folder; KEEP_ETCD: left running, with its part of the folder (for
    `down` to stop last, remove_etcd)."""
    try:
        me = machines.info(cluster)
    except machines.MachineError:
        me = None
    if forget_store is None:
        forget_store = me is None or bool(me.get("first"))
    etcd = etcdrun.owned(cluster)
    if etcd is not None and not keep_etcd:
        forget_store = False        # its keys go with its data
    spare = {etcd["pid"]} if etcd is not None and keep_etcd else set()
    own = namespace_inodes(cluster)
    pid = _read_pid(cluster)
    if graceful and pid is not None and journal.running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)        # a stopped supervisor must act on it
        deadline = time.monotonic() + 15
        while journal.running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if etcd is not None and not keep_etcd:
        etcdrun.stop_owned(cluster)     # SIGTERM, once the rest no longer needs it
    for _ in range(10):
        pids = [p for p in cluster_processes(cluster, own) if p not in spare]
        if not pids:
            break
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.1)
    errors = []
    if me is not None:
        with contextlib.suppress(netns.NetnsError, OSError):
            machines.remove_tunnels(cluster)    # their socket in this machine's namespace goes now
    for name, ino in reversed(journal.namespaces(cluster)):
        try:
            netns.delete(name, only_inode=ino)
        except netns.NetnsError as e:
            errors.append(str(e))
    apiserver.forget(cluster)       # the kubeconfig context up added
    if etcd is None or keep_etcd:
        problem = store_module.forget(cluster) if forget_store else _forget_machine(cluster, me)
        if problem:
            errors.append(problem)
    if spare:
        _remove_all_but_etcd(cluster)
    else:
        shutil.rmtree(names.state_dir(cluster), ignore_errors=True)
    if errors:
        raise ClusterError("; ".join(errors))


def _remove_all_but_etcd(cluster: str) -> None:
    """CLUSTER's state folder but for the etcd's record and folder (teardown
    with keep_etcd; remove_etcd removes the rest)."""
    folder = names.state_dir(cluster)
    keep = {os.path.basename(etcdrun.owned_path(cluster)), os.path.basename(etcdrun.owned_dir(cluster))}
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return
    for entry in set(entries) - keep:
        path = os.path.join(folder, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def require_here(topology, spec) -> None:
    """A node's kernel objects can be changed only on the machine it runs on."""
    here = machines.name(topology.name)
    if here is not None and spec.machine not in (None, here):
        raise ClusterError(f'node "{spec.name}" runs on machine {spec.machine} (this is {here}): '
                           "run this there")


def _forget_machine(cluster: str, me: dict | None) -> str | None:
    """Delete this machine's key from the cluster's store (None: done, or no key)."""
    if me is None:
        return None
    try:
        store = open_store(cluster)
        try:
            store.delete(machines.key(me["name"]))
        finally:
            store.close()
    except Exception as e:      # noqa: BLE001 - an etcd away: the key's TTL ends it
        return f"machine {me['name']}'s key in the cluster's etcd remains until its TTL ends: {e}"
    return None


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

    topology = clusterconfig.read(cluster)
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
                        unschedulable=unschedulable, machine=machines.name(cluster))
        try:
            host.create(cluster, name, iface, settings.underlay_mtu,
                        settings.effective_client_address(), tso=settings.backend != "udp",
                        impairment=spec.uplink(settings))
        except BaseException:
            # Only if this call made it: the name may have been taken.
            journal.delete_netns(cluster, names.node_ns(cluster, name))
            raise
        os.makedirs(names.node_dir(cluster, name), exist_ok=True)

        def append(t) -> None:
            # On the settings as they are now (compare-and-swap): a `link set`
            # or another `node add` meanwhile is kept.
            if any(n.name == name for n in t.nodes):
                raise ClusterError(f'node "{name}" already exists')
            t.nodes.append(spec)
        clusterconfig.update(cluster, append, store)
        registry.create(store, node_object(spec, iface))
        return iface
    finally:
        store.close()


def remove_node(cluster: str, name: str, timeout: float = 30.0) -> None:
    """Drain a node as `kubectl drain --ignore-daemonsets` does, then remove it.

    Cordon it (unless it already is), evict its pods except those a DaemonSet
    manages, and wait for them to go. Then the node is marked as being deleted
    (metadata.deletionTimestamp: the DaemonSet controller gives such a node no
    pod, although DaemonSet pods tolerate a cordon), its DaemonSet pods are
    deleted too, since their namespaces go with the node, its lease released and
    its object deleted. If any of it fails, the node is left as it was found:
    uncordoned if this cordoned it, no longer marked."""
    from netemu.k8s import ownership

    topology = clusterconfig.read(cluster)
    if any(n.name == name for n in topology.nodes):
        require_here(topology, topology.node(name))
    if [n.name for n in topology.nodes] == [name]:
        raise ClusterError(f'node "{name}" is the cluster\'s last node (netemu down {cluster} instead)')
    store = open_store(cluster)
    try:
        node = registry.get(store, "Node", None, name)
        if node is None:
            raise ClusterError(f'nodes "{name}" not found')
        cordoned = not (node.get("spec") or {}).get("unschedulable")
        if cordoned:
            registry.mutate(store, "Node", None, name, lambda n: n.setdefault("spec", {}).update(unschedulable=True))

        def pods_here(daemons: bool) -> list[dict]:
            return [p for p in registry.list_(store, "Pod")
                    if (p.get("spec") or {}).get("nodeName") == name
                    and ((ownership.controller_ref(p) or {}).get("kind") == "DaemonSet") == daemons]

        def evict(pods: list[dict]) -> None:
            for pod in pods:
                api.delete_pod(store, pod["metadata"].get("namespace", "default"), pod["metadata"]["name"],
                               uid=pod["metadata"].get("uid"))

        def wait_gone(daemons: bool, deadline: float) -> None:
            while True:
                left = pods_here(daemons)
                if not left:
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(f"node {name}: pods did not stop within {timeout:g} s: "
                                       + ", ".join(p["metadata"]["name"] for p in left[:5]))
                time.sleep(0.1)

        deadline = time.monotonic() + timeout
        try:
            evict(pods_here(daemons=False))
            wait_gone(False, deadline)
            registry.mutate(store, "Node", None, name,
                            lambda n: n["metadata"].setdefault("deletionTimestamp", registry.now()))
            evict(pods_here(daemons=True))
            wait_gone(True, deadline)
        except BaseException:
            def restore(n):
                n["metadata"].pop("deletionTimestamp", None)
                if cordoned:
                    n.setdefault("spec", {})["unschedulable"] = False
            with contextlib.suppress(Exception):
                registry.mutate(store, "Node", None, name, restore)
            raise
        for lease in leases.read_leases(store):
            if lease.node == name:
                leases.release(store, lease)
        registry.delete(store, "Node", None, name)
    finally:
        store.close()
    # The uplink's impairment goes first: its delay lines (one in the node, one
    # in the fabric) are not the node's daemons, and the fabric's rules for the
    # node's port would outlive the port.
    spec = next((n for n in topology.nodes if n.name == name), None)
    if spec is not None and spec.uplink(topology.settings):
        from netemu.impairment import Impairment
        host.uplink(cluster, name, topology.settings.underlay_mtu).impair(Impairment())
    # The control plane stops the node's daemons when its object goes; wait for them.
    node_namespace = names.node_ns(cluster, name)
    inode = netns.inode(node_namespace)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and inode is not None and _processes_in(inode):
        time.sleep(0.05)
    journal.delete_netns(cluster, node_namespace)
    # Its heartbeat has stopped with it; Kubernetes collects a node's Lease with
    # the node (an owner reference), so does this.
    store = open_store(cluster)
    try:
        registry.delete(store, "Lease", "kube-node-lease", name)
        from netemu.overlay import stats
        store.delete(stats.stats_key(name))
        store.delete(stats.request_key(name))
    finally:
        store.close()
    shutil.rmtree(names.node_dir(cluster, name), ignore_errors=True)

    def drop(t) -> None:
        t.nodes = [n for n in t.nodes if n.name != name]
    clusterconfig.update(cluster, drop)


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
