"""The Python API: what the netemu command does, for scripted experiments.

    import netemu

    with netemu.up({"name": "lab", "nodes": [{"name": "a"}, {"name": "b"}]}) as lab:
        lab.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                   "spec": {"containers": [{"name": "c", "image": "nginx"}]}})
        lab.wait()
        r = lab.nodes["a"].exec(["curl", "-s", lab.pods["web"].ip])     # a node reaches every pod
        print(r.returncode, r.stdout)
    # here the cluster is gone, whatever the body did (an exception, SIGTERM)

One class per role, as the CLI's verbs are: `up` builds a cluster from a
topology (a dict shaped like a topology file, a file, or a loaded Topology) and
waits for it; `Cluster` is a running cluster, built or attached to by name
(`netemu.Cluster("lab")`), with kubectl's verbs as methods (apply, get, delete,
expose, exec, logs, wait), the capture verbs (capture, capturing, packets,
trace, graph), `netemu link` (link, links) and `netemu node` (add_node,
remove_node); its
`pods`, `nodes` and `client` index what runs in it (`lab.pods["web"].exec(...)`,
`lab.nodes["a"].exec(...)`), as Mininet's `net["h1"]` does. `benchmark` is
`netemu bench`.

Every method is a thin layer over the module the CLI uses (netemu.cluster,
netemu.api, netemu.topology, netemu.capture, netemu.bench); nothing here talks
to the kernel itself. Errors are the CLI's, as exceptions: TopologyError (bad
topology or manifest: "<file or <dict>>: <field>: <problem>"), ApiError
(refused by the API server: str() is kubectl's message, .reason its reason),
ClusterError (no such cluster, not ready, ...), CliError (no such pod,
container not running), ImpairmentError (a bad link property: "<property>:
<problem>"). Warnings go to the "netemu" logger (shown on stderr unless
logging is configured otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Sequence

from netemu import api, cluster as clusters, kubectl_verbs, names
from netemu.k8s import kinds
from netemu.store import registry

log = logging.getLogger("netemu")

EXEC_TIMEOUT = 60.0
DICT = "<dict>"


class ExecResult(subprocess.CompletedProcess):
    """What a command run in a pod, a node or the client did: args (the command
    as given), returncode, stdout and stderr (text), as subprocess.run returns.
    check_returncode() raises CalledProcessError on a non-zero status."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# -- building --------------------------------------------------------------------------

def load(topology, *, name: str | None = None, backend: str | None = None,
         proxy_mode: str | None = None, base: str | os.PathLike | None = None):
    """A validated Topology from a dict shaped like a topology file (workload
    paths relative to BASE, default the current directory), a topology file's
    path, or a Topology already loaded. Flags as `netemu up`'s. Raises
    TopologyError."""
    from netemu.topology import loader
    from netemu.topology.model import Topology

    if isinstance(topology, Topology):
        if (name, backend, proxy_mode, base) != (None, None, None, None):
            raise ValueError("name, backend, proxy_mode and base apply to a dict or a file, not a loaded Topology")
        return topology
    if isinstance(topology, Mapping):
        return loader.load_topology_dict(dict(topology), name=name, backend=backend, proxy_mode=proxy_mode,
                                         base=base)
    if base is not None:
        raise ValueError("base is for a dict's workload paths: a file's are relative to the file")
    if isinstance(topology, (str, os.PathLike)):
        return loader.load_topology(topology, name=name, backend=backend, proxy_mode=proxy_mode)
    raise TypeError(f"a topology is a dict, a file's path or a Topology, not {type(topology).__name__}")


def up(topology, *, name: str | None = None, backend: str | None = None,
       proxy_mode: str | None = None, base: str | os.PathLike | None = None, progress=None,
       kubeconfig: bool = True) -> "Cluster":
    """Build a cluster and wait until it is ready (`netemu up`); returns it.

    As a context manager (`with netemu.up(...) as c:`) it is torn down when the
    block ends, however it ends: an exception, Ctrl-C, SIGTERM or SIGHUP (turned
    into an exception while the block runs, as `netemu up` does). Without
    `with`, call down() yourself. A failed or interrupted up rolls back what it
    built. PROGRESS: a function given each progress line (default: the "netemu"
    logger at INFO level). KUBECONFIG=False: add no context to the user's
    kubeconfig, and write nothing to it at down (throw-away clusters, such
    as the benchmark's)."""
    topo = load(topology, name=name, backend=backend, proxy_mode=proxy_mode, base=base)
    for w in topo.warnings:
        log.warning("%s", w)
    clusters.require_root()
    where = "--name" if name else f"{topo.source or DICT}: name"
    with _signals_as_exceptions():
        clusters.up(topo, progress or (lambda line: log.info("%s", line)), where=where, kubeconfig=kubeconfig)
    cluster = Cluster(topo.name)
    cluster.owned = True
    cluster.warnings = list(topo.warnings)
    return cluster


def benchmark(backends: Sequence[str] | None = None, tests: Sequence[str] | None = None, *,
              rounds: int = 3, duration: float = 5.0, mtu: int = 1500, output: str = "bench-results",
              wait: float = 0.0, link: Mapping | None = None, progress=None) -> dict:
    """`netemu bench`: builds its own throw-away clusters, returns the results
    (also written to OUTPUT as bench.json, bench.md, bench.png). LINK impairs
    every node uplink, as `--link` does: {"delay": "10ms", "loss": "0.1%"}
    (a topology's cluster.link; checked first: ImpairmentError)."""
    from netemu import impairment
    from netemu.bench import report, runner

    link = {k: v for k, v in (link or {}).items()}
    impairment.parse(link)          # refused before any cluster is built

    chosen = report.parse_list(",".join(backends or report.BACKENDS), report.BACKENDS, "backend")
    if "host-gw" not in chosen:
        chosen.append("host-gw")             # every ratio is to host-gw, in the same round
    opts = runner.Options(backends=chosen, tests=report.parse_list(",".join(tests or report.TESTS),
                                                                   report.TESTS, "test"),
                          rounds=rounds, duration=duration, mtu=mtu, output=output, lock_wait=wait,
                          link=link)
    if opts.rounds < 1 or opts.duration <= 0:
        raise ValueError("rounds must be ≥ 1 and duration > 0")
    step = progress or (lambda line: log.info("%s", line))
    return runner.run(opts, on_step=step, on_setup=step)


# -- a running cluster ----------------------------------------------------------------------

class Cluster:
    """A running cluster. Cluster(NAME) attaches to one (None: $NETEMU_CLUSTER,
    or the only one running); leaving `with Cluster(NAME):` does not tear down
    a cluster this object did not build (see up)."""

    def __init__(self, name: str | None = None):
        self.name = clusters.resolve(name)
        self.owned = False              # built by up(): torn down by __exit__
        self.warnings: list[str] = []
        self.pods = Pods(self)
        self.nodes = Nodes(self)
        self.client = Host(self, "client", names.client_ns(self.name))
        self._signals: contextlib.ExitStack | None = None

    def __repr__(self) -> str:
        return f"<netemu.Cluster {self.name!r}>"

    def __enter__(self) -> "Cluster":
        if self.owned:
            # SIGTERM/SIGHUP end the block with an exception, so __exit__ runs.
            self._signals = contextlib.ExitStack()
            self._signals.enter_context(_signals_as_exceptions())
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.owned:
                # A second Ctrl-C or SIGTERM must not cut the teardown short (its
                # waits are bounded, so this cannot hang for long).
                with clusters._signals_deferred():
                    self.down()
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None

    def down(self) -> None:
        """`netemu down`: stop the control plane and remove everything the
        cluster made (idempotent)."""
        clusters.teardown(self.name, graceful=True)

    @property
    def running(self) -> bool:
        return self.name in clusters.running_clusters()

    @contextlib.contextmanager
    def _store(self, writes: bool = False) -> Iterator[Any]:
        # As every CLI verb: a change nobody would act on is refused, else warn.
        clusters.check_control_plane(self.name, writes, lambda line: log.warning("%s", line))
        store = clusters.open_store(self.name)
        try:
            yield store
        finally:
            store.close()

    def wait(self, timeout: float = clusters.READY_TIMEOUT) -> dict:
        """Until every node is Ready and every pod settled, as `up` waits
        (after apply, say). Returns {"nodes": [...], "pods": [...]}. Raises
        ClusterError after TIMEOUT seconds, saying what is not ready."""
        return clusters.wait_ready(self.name, lambda line: log.info("%s", line), timeout)

    # -- objects -------------------------------------------------------------------------

    def apply(self, *objects, namespace: str | None = None) -> list[dict]:
        """`kubectl apply`: create or update each object; an argument is an
        object (a dict), a list of them, or a manifest file or directory. All
        are validated, alone and together, against the cluster before any is
        stored (unlike `netemu apply`, which goes on past bad ones: a script
        wants its first mistake, not half an experiment). Returns the stored
        objects (with what the API server allocated: clusterIP, nodePorts ...).
        Raises TopologyError, or ApiError when the API server refuses one (a
        nodePort taken meanwhile: the objects before it stay stored)."""
        from netemu import workloads_cli
        from netemu.topology import manifests

        entries = []
        given = 0                   # objects given as data so far: "<dict>: object N" counts them all
        for item in objects:
            if isinstance(item, (str, os.PathLike)):
                path = Path(item)
                if not path.exists():
                    raise workloads_cli.WorkloadCliError(f'the path "{item}" does not exist')
                for file in manifests.manifest_files(path):
                    entries.extend(manifests.read_manifest_file(file))
            else:
                batch = item if isinstance(item, list) else [item]
                entries.extend(manifests.entries_from_objects(batch, DICT, first=given + 1))
                given += len(batch)
        with self._store(writes=True) as store:
            settings, nodes = workloads_cli._cluster_context(self.name, store)
            for w in manifests.check_batch(entries, settings, nodes):
                log.warning("%s", w)
            objs = workloads_cli._in_namespace([e.obj for e in entries], namespace)
            return [api.create_or_update(store, obj, settings)[0] for obj in objs]

    def get(self, kind: str, name: str | None = None, *, namespace: str | None = "default",
            selector: str | None = None):
        """`kubectl get`: one object by NAME (ApiError NotFound if there is
        none), else a list of the kind (namespace None: all namespaces),
        optionally by label SELECTOR ("app=web,tier!=db")."""
        kind = _kind(kind)
        with self._store() as store:
            if name is not None:
                obj = registry.get(store, kind, namespace, name)
                if obj is None:
                    raise api.ApiError(f'{kinds.BY_KIND[kind].qualified()} "{name}" not found',
                                       reason="NotFound")
                return obj
            objs = registry.list_(store, kind, namespace)
        if selector is None:
            return objs
        from netemu.k8s import selectors
        requirements = selectors.parse_label_selector(selector)
        return [o for o in objs if selectors.labels_match(requirements, o["metadata"].get("labels"))]

    def delete(self, what, name: str | None = None, *, namespace: str = "default", wait: bool = True,
               timeout: float | None = None, grace_period: int | None = None) -> list[dict]:
        """`kubectl delete`: delete(KIND, NAME), or the objects of an object
        dict, a list of them, or a manifest file. Waits until they are gone
        (wait=False: not). Returns the deleted objects. Raises ApiError
        (NotFound: kubectl's message), or ClusterError on a timeout."""
        from netemu import workloads_cli

        if isinstance(what, str) and name is not None:
            kind = _kind(what)
            targets = [(kind, namespace if kinds.BY_KIND[kind].namespaced else None, name)]
        elif name is not None:
            raise TypeError("delete(KIND, NAME), or delete(objects) without a name")
        else:
            # An object's own namespace counts; NAMESPACE is for those that name none.
            objs = workloads_cli._in_namespace(self._objects(what), namespace)
            targets = [(_kind(o["kind"]), o["metadata"].get("namespace") if kinds.BY_KIND[_kind(o["kind"])].namespaced
                        else None, o["metadata"]["name"]) for o in objs]
        deleted = []
        with self._store(writes=True) as store:
            for kind, ns, obj_name in targets:
                deleted.append(api.delete(store, kind, ns, obj_name, grace_period=grace_period))
            if wait:
                limit = workloads_cli.DELETE_TIMEOUT if timeout is None else timeout
                for obj in deleted:
                    kind, meta = obj["kind"], obj["metadata"]
                    if not workloads_cli.wait_gone(store, kind, meta.get("namespace"), meta["name"],
                                                   meta.get("uid"), limit):
                        raise clusters.ClusterError(f"timed out waiting for the condition on "
                                                    f"{kinds.BY_KIND[kind].qualified()}/{meta['name']}")
        return deleted

    def _objects(self, what) -> list[dict]:
        from netemu.topology import manifests

        if isinstance(what, (str, os.PathLike)):
            return [e.obj for f in manifests.manifest_files(Path(what)) for e in manifests.read_manifest_file(f)]
        return [e.obj for e in manifests.entries_from_objects(what if isinstance(what, list) else [what], DICT)]

    def expose(self, kind: str, name: str, port: int | None = None, *, target_port=None,
               type: str = "ClusterIP", service_name: str | None = None, protocol: str = "TCP",
               namespace: str = "default") -> dict:
        """`kubectl expose KIND NAME --port --target-port --type --name`: a
        Service selecting what KIND/NAME selects. Returns it with what the API
        server allocated: spec.clusterIP, nodePorts, and a LoadBalancer's
        external IP (status.loadBalancer.ingress). Raises ApiError."""
        from netemu import clusterconfig

        with self._store(writes=True) as store:
            return kubectl_verbs.expose(store, _kind(kind), name, port, target_port, type, service_name,
                                        protocol, namespace=namespace,
                                        settings=clusterconfig.read(self.name, store).settings)

    # -- commands ------------------------------------------------------------------------

    def exec(self, target: str, command, *, container: str | None = None, namespace: str = "default",
             input: str | None = None, timeout: float | None = EXEC_TIMEOUT, retry: float = 0,
             check: bool = False) -> ExecResult:
        """Run COMMAND where TARGET says: a pod (NAME or pod/NAME, as
        `netemu exec` in CONTAINER, default the first), a node (node/NAME) or
        "client" (the external client; a pod named client is pod/client). COMMAND is an argv list, or a string run
        by sh -c. Returns an ExecResult; check=True raises CalledProcessError on
        a non-zero status; TIMEOUT (seconds, None: none) kills the command and
        raises subprocess.TimeoutExpired. RETRY: seconds to run it again while it
        fails (a service's rules reach the nodes' proxies a moment after apply or
        expose); the last attempt's result is returned."""
        if target == "client":
            return self.client.exec(command, input=input, timeout=timeout, retry=retry, check=check)
        word, sep, name = target.partition("/")
        if sep and word in kinds.BY_KIND["Node"].words:
            return self.nodes[name].exec(command, input=input, timeout=timeout, retry=retry, check=check)
        if sep and word not in kinds.BY_KIND["Pod"].words:
            raise ValueError(f'exec target "{target}": use a pod (NAME or pod/NAME), node/NAME or client')
        pod = name if sep else target
        return Pod(self, namespace, pod).exec(command, container=container, input=input, timeout=timeout,
                                              retry=retry, check=check)

    def logs(self, pod: str, container: str | None = None, *, namespace: str = "default",
             previous: bool = False) -> str:
        """`kubectl logs POD [-c CONTAINER] [-p]`: what the container wrote so
        far. POD may be job/NAME, rc/NAME, ... (its first pod, as kubectl ranks
        them). Raises CliError (no such pod or container, no log yet) or
        ApiError (no previous instance)."""
        from netemu.cli import CliError, container_log
        from netemu.node import kubeletport

        with self._store() as store:
            name, container, obj, path = container_log(self.name, store, namespace, pod, container)
            node = kubeletport.elsewhere(self.name, store, obj)
            if node is not None:        # a pod of another machine: its kubelet's port
                return kubeletport.read_log(self.name, store, node, namespace, name, container, previous)
            if previous:
                _, _, _, path = container_log(self.name, store, namespace, name, container, previous)
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            raise CliError(f"no log yet at {path}") from None

    # -- packets ---------------------------------------------------------------------------

    def _target(self, target: str, namespace: str):
        from netemu.capture import targets

        return targets.resolve_target(targets.load_view(self.name), target, namespace)

    @contextlib.contextmanager
    def capturing(self, target: str, path: str, filter: str | None = None, *, interface: str | None = None,
                  count: int | None = None, namespace: str = "default", promiscuous: bool = True):
        """tcpdump on TARGET (a pod, a node, "fabric", "client" or "lb", as
        `netemu capture`) into the pcap file PATH while the with-block runs; it
        listens before the block starts. Yields the capture: .stats (tcpdump's
        counts: captured, dropped ...) once the block has ended."""
        from netemu.capture import tcpdump

        t = self._target(target, namespace)
        if t.outer_iface is not None:
            raise ValueError(f"{t.label} is captured at two layers: use `netemu capture {t.label}` "
                             f"(or capturing() on fabric with interface={t.iface!r})")
        with tcpdump.capture(t.netns, interface or t.iface, str(path), filter, count=count,
                             promiscuous=promiscuous) as cap:
            yield cap

    def capture(self, target: str, path: str, duration: float | None = None, filter: str | None = None, *,
                interface: str | None = None, count: int | None = None, namespace: str = "default",
                promiscuous: bool = True):
        """`netemu capture TARGET -w PATH --duration S [-c N]`: capture for
        DURATION seconds (or until COUNT packets) and return the finished
        capture (.stats, .pcap_path). For traffic the script makes itself, use
        capturing() around it."""
        if duration is None and count is None:
            raise ValueError("capture: give a duration or a count (or use capturing() around the traffic)")
        with self.capturing(target, path, filter, interface=interface, count=count, namespace=namespace,
                            promiscuous=promiscuous) as cap:
            with contextlib.suppress(subprocess.TimeoutExpired):
                cap.proc.wait(duration)         # ends early once COUNT packets are in
        return cap

    def packets(self, path: str) -> list:
        """The packets of a pcap file, decoded as `netemu decode` does (outer and
        inner headers; this cluster's backend port known): a list of Decoded,
        netemu.capture.decode.format_decoded(d) prints one as a line."""
        from netemu.capture import cli as capture_cli, decode, targets

        capture_cli._register_cluster_ports(targets.load_view(self.name))
        return list(decode.decode_pcap(str(path)))

    def trace(self, source: str, dest: str, *, port: int | None = None, proto: str = "tcp",
              namespace: str = "default", timeout: float = 2.0, keep_pcaps: str | None = None):
        """`netemu trace`: one probe from SOURCE (a pod or "client") to DEST (a
        pod, service, ClusterIP, NODE:NODEPORT or external IP), seen at every
        hop. Returns the TraceResult: .reached, .forward and .reply hops, .rules;
        str() of it is what `netemu trace` prints."""
        from netemu.capture import targets, trace

        return trace.run_trace(targets.load_view(self.name), source, dest, port=port, proto=proto,
                               namespace=namespace, timeout=timeout, keep_pcaps=keep_pcaps)

    def graph(self, path: str | None = None) -> str:
        """`netemu graph`: the cluster's layout as text; with PATH (.svg or
        .png) also drawn there."""
        from netemu.capture import graph, targets

        view = targets.load_view(self.name)
        if path is not None:
            graph.write_picture(graph.cluster_drawing(view), path)
        return graph.cluster_text(view)

    # -- links -------------------------------------------------------------------------------

    def link(self, node: str, *, rate=None, loss=None, duplicate=None, limit=None, delay=None, jitter=None,
             reorder=None, corrupt=None, clear: bool = False) -> dict[str, str]:
        """`netemu link set NODE --rate R --loss P ... | --clear`: impair NODE's
        uplink, both directions, at once; the properties given change, the
        others stay (rate=0 removes the rate and its limit, delay=0 the delay,
        jitter and reorder; clear=True removes everything). Values as the
        command's flags and a topology file's `link:` take them: rate "100mbit",
        loss/duplicate/reorder "1%" (or a number of percent), delay/jitter
        "20ms", limit a number of packets. The setting is saved with the
        cluster (`netemu link show` sees it). Returns the link's properties now
        ({"rate": "100mbit", "loss": "1%"}). Raises ImpairmentError (a bad or
        unsupported value: "rate: invalid rate ..."; nothing is changed),
        ClusterError (no such node)."""
        from netemu import link_cli

        given = {k: v for k, v in (("rate", rate), ("loss", loss), ("duplicate", duplicate), ("limit", limit),
                                   ("delay", delay), ("jitter", jitter), ("reorder", reorder),
                                   ("corrupt", corrupt)) if v is not None}
        if clear and given:
            raise ValueError(f"link {node}: clear=True takes no other property (given: {', '.join(given)})")
        if not clear and not given:
            raise ValueError(f"link {node}: nothing to set (give rate, loss, duplicate, limit, delay, jitter, "
                             "reorder or clear=True)")
        # flag "": the error names the keyword as given ("rate: ..."), not --rate.
        return link_cli.set_link(self.name, node, None if clear else given, flag="").settings()

    def links(self, node: str | None = None, *, pod: str | None = None, namespace: str = "default") -> dict:
        """`netemu link show [NODE | pod/POD -n NAMESPACE] -o json`: each node's
        uplink by node name, then each pod's own link (its netemu.io/link
        annotation) as "pod/NAMESPACE/NAME"; NODE or POD: that one only. Each
        is {"settings": {"rate": "100mbit", ...}, "mechanisms": which kernel
        object does each, "installed": per end ("NAMESPACE/DEVICE"), its root
        qdiscs, nft tables and delay-line process ({"pid", "tap"} or None), as
        read back from the kernel (None: that end's namespace does not exist)};
        a pod's also "pod", "namespace", "node" and "ends"."""
        from netemu import link_cli

        return link_cli.show(self.name, node, pod=pod, namespace=namespace if pod is not None else None)

    # -- nodes -------------------------------------------------------------------------------

    def add_node(self, name: str, labels: dict | None = None, *, address: str | None = None,
                 pod_cidr: str | None = None, unschedulable: bool = False) -> "Node":
        """`netemu node add`: build a node, wait until it is Ready."""
        clusters.check_control_plane(self.name, True, lambda line: log.warning("%s", line))
        clusters.add_node(self.name, name, labels or {}, address, pod_cidr, unschedulable)
        with self._store() as store:
            clusters.wait_node_ready(store, name)
        return self.nodes[name]

    def remove_node(self, name: str) -> None:
        """`netemu node remove`: drain the node, then remove it."""
        clusters.check_control_plane(self.name, True, lambda line: log.warning("%s", line))
        clusters.remove_node(self.name, name)


def _signals_as_exceptions():
    """SIGTERM and SIGHUP raised as an exception (netemu.cli.Interrupted), as
    `netemu up` does, so that what is built is torn down. Python lets only the
    main thread set handlers: elsewhere, nothing changes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    from netemu.cli import _signals_interrupt
    return _signals_interrupt()


def _kind(word: str) -> str:
    try:
        return kinds.resolve(word)
    except KeyError:
        raise ValueError(f'the server doesn\'t have a resource type "{word}"') from None


RETRY_INTERVAL = 0.2


def _run(argv: list[str], command, env: dict | None, input: str | None, timeout: float | None,
         retry: float, check: bool) -> ExecResult:
    import time

    deadline = time.monotonic() + retry
    while True:
        proc = subprocess.run(argv, env=env, input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if proc.returncode == 0 or time.monotonic() + RETRY_INTERVAL > deadline:
            break
        time.sleep(RETRY_INTERVAL)
    result = ExecResult(command, proc.returncode, proc.stdout, proc.stderr)
    if check:
        result.check_returncode()
    return result


def _argv(command) -> list[str]:
    if isinstance(command, str):
        return ["sh", "-c", command]
    argv = [str(a) for a in command]
    if not argv:
        raise ValueError("you must specify at least one command")
    return argv


# -- what runs in a cluster, by name ------------------------------------------------------------

class Host:
    """A network namespace of the cluster commands run in: the client, or a node."""

    def __init__(self, cluster: Cluster, name: str, netns: str):
        self.cluster, self.name, self.netns = cluster, name, netns

    def __repr__(self) -> str:
        return f"<netemu {self.name} in {self.netns}>"

    def exec(self, command, *, input: str | None = None, timeout: float | None = EXEC_TIMEOUT,
             retry: float = 0, check: bool = False) -> ExecResult:
        """Run COMMAND (argv list, or a string for sh -c) here; see Cluster.exec."""
        from netemu import netns

        env = dict(os.environ)
        env[names.CLUSTER_ENV] = self.cluster.name
        return _run(netns.exec_argv(self.netns, _argv(command)), command, env, input, timeout, retry, check)


class Node(Host):
    """A node of the cluster: `cluster.nodes["a"]`."""

    @property
    def object(self) -> dict:
        return self.cluster.get("node", self.name)

    @property
    def address(self) -> str | None:
        """Its underlay (InternalIP) address."""
        return next((a["address"] for a in (self.object.get("status") or {}).get("addresses", [])
                     if a.get("type") == "InternalIP"), None)


class Pod:
    """A pod of the cluster: `cluster.pods["web"]` ("NAMESPACE/NAME" for
    another namespace than default)."""

    def __init__(self, cluster: Cluster, namespace: str, name: str):
        self.cluster, self.namespace, self.name = cluster, namespace, name

    def __repr__(self) -> str:
        return f"<netemu pod {self.namespace}/{self.name}>"

    @property
    def object(self) -> dict:
        """The pod as the store has it now."""
        return self.cluster.get("pod", self.name, namespace=self.namespace)

    @property
    def ip(self) -> str | None:
        return (self.object.get("status") or {}).get("podIP")

    @property
    def node(self) -> str | None:
        return (self.object.get("spec") or {}).get("nodeName")

    def exec(self, command, *, container: str | None = None, input: str | None = None,
             timeout: float | None = EXEC_TIMEOUT, retry: float = 0, check: bool = False) -> ExecResult:
        """Run COMMAND (argv list, or a string for sh -c) in this pod, as
        `netemu exec POD -c CONTAINER -- COMMAND`; see Cluster.exec."""
        from netemu.cli import pod_exec

        with self.cluster._store() as store:
            argv, env = pod_exec(self.cluster.name, store, self.namespace, self.name, container,
                                 _argv(command))
        return _run(argv, command, env, input, timeout, retry, check)


class _Index(Mapping):
    """Objects of one kind by name, read from the store at each use."""

    kind = ""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def _names(self) -> list[str]:
        return [o["metadata"]["name"] for o in self.cluster.get(self.kind, namespace=None)]

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class Pods(_Index):
    kind = "Pod"

    def _names(self) -> list[str]:
        # Keys as __getitem__ takes them: NAME in default, NAMESPACE/NAME elsewhere.
        out = []
        for o in self.cluster.get("Pod", namespace=None):
            ns = o["metadata"].get("namespace", "default")
            out.append(o["metadata"]["name"] if ns == "default" else f"{ns}/{o['metadata']['name']}")
        return out

    def __getitem__(self, key: str) -> Pod:
        namespace, _, name = key.rpartition("/")
        namespace = namespace or "default"
        with self.cluster._store() as store:
            if registry.get(store, "Pod", namespace, name) is None:
                raise KeyError(key)
        return Pod(self.cluster, namespace, name)


class Nodes(_Index):
    kind = "Node"

    def __getitem__(self, name: str) -> Node:
        with self.cluster._store() as store:
            if registry.get(store, "Node", None, name) is None:
                raise KeyError(name)
        return Node(self.cluster, name, names.node_ns(self.cluster.name, name))
