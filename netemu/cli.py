"""The netemu command: kubectl's verbs for an emulated cluster, plus up/down/clean.

Exit status: 0 on success, 1 on an error (one line saying what and where), 2 on
bad usage (argparse's own convention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys

from netemu import cluster as clusters, names, printers
from netemu.k8s import kinds
from netemu.store import registry
from netemu.store.base import Conflict


class CliError(Exception):
    pass


def _topology_error():
    from netemu.topology.model import TopologyError
    return TopologyError


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`netemu get pods | head -1`): stop quietly, as
        # kubectl does when SIGPIPE ends it, with the status a shell reports for
        # that (128 + SIGPIPE). stdout points at /dev/null from here on so that
        # the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A topology file with the shebang "#!/usr/bin/env -S netemu up" runs as
    # `netemu up FILE`; `netemu FILE.yaml` is taken the same way.
    if argv and argv[0].endswith((".yaml", ".yml")) and os.path.isfile(argv[0]):
        argv.insert(0, "up")
    # Everything after the first "--" is the command to run (exec, client exec),
    # whatever options it has: argparse must not see it.
    trailing = None
    if "--" in argv:
        cut = argv.index("--")
        argv, trailing = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # kubectl takes names after flags too (`get pods -o wide NAME`); argparse
        # stops filling a positional list at the first flag, so the rest of the
        # names come back here. Anything else (an unknown flag) is the usual error.
        if getattr(args, "names_after_flags", False) and not any(a.startswith("-") for a in extra):
            args.names = list(args.names) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if trailing is not None:
        if not hasattr(args, "command"):
            parser.error("unexpected arguments after --")
        args.command = list(args.command) + trailing
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "needs_root", True):
            clusters.require_root()
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Interrupted as e:
        print(f"netemu: {e}: rolled back", file=sys.stderr)
        return 128 + e.signum
    except (clusters.ClusterError, CliError, PermissionError, FileNotFoundError, ValueError,
            Conflict) as e:
        print(f"netemu: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line for the user, the trace in the log
        from netemu.api import ApiError
        if isinstance(e, ApiError):
            # kubectl's own wording: "Error from server (NotFound): pods "x" not found"
            print(f"Error from server ({e.reason}): {e}", file=sys.stderr)
            return 1
        if isinstance(e, _topology_error()):
            print(f"netemu: error: {e}", file=sys.stderr)
            return 1
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netemu", description="Kubernetes pod networking, emulated with "
                                "real namespaces, bridges, tunnels and DNAT rules.")
    sub = p.add_subparsers(metavar="COMMAND")

    def verb(name, func, help_, root=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func, needs_root=root)
        return sp

    def with_cluster(sp):
        sp.add_argument("--cluster", help="cluster name (default: $NETEMU_CLUSTER, or the only one running)")
        return sp

    sp = verb("up", cmd_up, "build a cluster from a topology file and wait until it is ready")
    sp.add_argument("file")
    sp.add_argument("--name", help="cluster name (overrides the file)")
    sp.add_argument("--backend", choices=["udp", "vxlan", "host-gw"])
    sp.add_argument("--proxy-mode", choices=["nftables", "iptables"])
    sp.add_argument("--store", metavar="etcd://HOST:PORT",
                    help="keep the cluster's state in this etcd (under /netemu/NAME) instead of a "
                         "SQLite file in /run/netemu/NAME (a topology with machines: and no --store "
                         "starts an etcd of the cluster's own on the first machine)")
    sp.add_argument("-q", "--quiet", action="store_true")

    sp = verb("join", cmd_join, "build this machine's part of a cluster over several machines "
              "(netemu up runs on the first; see machines: in the topology)")
    sp.add_argument("--store", metavar="etcd://HOST:PORT", required=True,
                    help="the etcd the cluster keeps its state in (as given to netemu up)")
    sp.add_argument("--machine", required=True, help="this machine's name in the topology's machines:")
    sp.add_argument("--cluster", help="the cluster to join (default: the only one in that etcd)")
    sp.add_argument("-q", "--quiet", action="store_true")

    sp = verb("down", cmd_down, "stop a cluster and remove everything it made")
    sp.add_argument("name", nargs="?", metavar="CLUSTER")
    sp.add_argument("--cluster", dest="cluster_opt")

    sp = verb("clean", cmd_clean, "remove everything of a cluster after a crash (kill -9, failed up)")
    sp.add_argument("name", nargs="?", metavar="CLUSTER")
    sp.add_argument("--cluster", dest="cluster_opt")

    verb("clusters", cmd_clusters, "list running clusters")

    sp = with_cluster(verb("get", cmd_get, "list objects (pods, nodes, svc, rc, rs, deploy, jobs, ds, ep, events)"))
    sp.add_argument("kind")
    sp.add_argument("names", nargs="*")
    sp.add_argument("-o", "--output", choices=["wide", "json", "yaml", "name"])
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("-A", "--all-namespaces", action="store_true")
    sp.add_argument("-l", "--selector", help="label query: key=value, key!=value, key in (a,b), key, !key")
    sp.add_argument("--show-labels", action="store_true", help="add a LABELS column")
    sp.add_argument("-w", "--watch", action="store_true",
                    help="after listing, print each change of the objects until interrupted")
    sp.set_defaults(names_after_flags=True)

    sp = with_cluster(verb("describe", cmd_describe, "show objects in detail (all of the kind when no name is "
                                                     "given; a name that is no object's is taken as a prefix)"))
    sp.add_argument("kind")
    sp.add_argument("names", nargs="*", metavar="name")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("-l", "--selector", help="label query, as for get")
    sp.set_defaults(names_after_flags=True)

    sp = with_cluster(verb("exec", cmd_exec, "run a command in a pod's namespaces: netemu exec POD [-c C] -- CMD"))
    sp.add_argument("pod")
    sp.add_argument("-c", "--container")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("-i", "--stdin", action="store_true", help="accepted for kubectl compatibility")
    sp.add_argument("-t", "--tty", action="store_true", help="accepted for kubectl compatibility")
    sp.add_argument("command", nargs="*", help="the command (after --)")

    sp = with_cluster(verb("logs", cmd_logs, "print a container's output (POD, pod/POD, or KIND/NAME of a job, "
                                             "rc, rs, deployment, daemonset: its first pod), or a node daemon's "
                                             "log (logs node/NAME overlay|proxy|kubelet|agent)"))
    sp.add_argument("pod")
    sp.add_argument("daemon", nargs="?")
    sp.add_argument("-c", "--container")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("--tail", type=int, default=-1)
    sp.add_argument("-f", "--follow", action="store_true",
                    help="keep printing what is written until the container ends (or Ctrl-C)")
    sp.add_argument("-p", "--previous", action="store_true",
                    help="the log of the container's previous instance (before its last restart)")

    sp = with_cluster(verb("stats", cmd_stats, "the overlay daemon's counters of a node (or all nodes)"))
    sp.add_argument("node", nargs="?")
    sp.add_argument("-o", "--output", choices=["json", "wide"])

    sp = with_cluster(verb("node", cmd_node, "add a node to a running cluster, or remove one: "
                                             "netemu node add NAME [--label k=v] | netemu node remove NAME"))
    sp.add_argument("action", choices=["add", "remove"])
    sp.add_argument("name")
    sp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--address", help="fixed underlay address")
    sp.add_argument("--pod-cidr", help="subnet to ask the overlay for")
    sp.add_argument("--unschedulable", action="store_true")

    from netemu.capture import cli as capture_cli
    capture_cli.register(sub, verb, with_cluster)
    from netemu import workloads_cli
    workloads_cli.register(sub, verb, with_cluster)
    from netemu.apiserver import cli as apiserver_cli
    apiserver_cli.register(sub, verb, with_cluster)
    from netemu.bench import cli as bench_cli
    bench_cli.register(sub, verb, with_cluster)
    from netemu import link_cli
    link_cli.register(sub, verb, with_cluster)
    from netemu import shell_cli
    shell_cli.register(sub, verb, with_cluster)

    sp = with_cluster(verb("client", cmd_client, "run a command on the external client (outside the cluster): "
                                                 "netemu client exec -- CMD"))
    sp.add_argument("action", choices=["exec"])
    sp.add_argument("command", nargs="*", help="the command (after --)")
    return p


# -- commands ------------------------------------------------------------------

def cmd_up(args) -> int:
    from netemu.topology.loader import load_topology

    topo = load_topology(args.file, name=args.name, backend=args.backend, proxy_mode=args.proxy_mode)
    for w in topo.warnings:
        print(f"netemu: warning: {w}", file=sys.stderr)
    neighbours = clusters.neighbour_table_warning(len(topo.nodes))
    if neighbours:
        print(f"netemu: warning: {neighbours}", file=sys.stderr)
    quiet = args.quiet
    where = "--name" if args.name else f"{args.file}: name"
    clusters.check_name(topo.name, where)       # before "Building": one line, nothing built

    def progress(line):
        if not quiet:
            print(f"  … {line}", file=sys.stderr, flush=True)

    if not quiet:
        print(f'Building cluster "{topo.name}" from {args.file} (backend {topo.settings.backend}, '
              f'proxy {topo.settings.proxy_mode})', file=sys.stderr)
    with _signals_interrupt():
        summary = clusters.up(topo, progress, where=where, store=args.store)
    print_summary(topo.name, summary)
    return 0


class Interrupted(BaseException):
    """SIGTERM or SIGHUP while `up` runs: unwinds like Ctrl-C, so up rolls back."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt():
    # `timeout 60 netemu up` sends SIGTERM; a closed terminal, SIGHUP. Their
    # default action ends the process at once, leaving a half-built cluster.
    def handler(signum, frame):
        # Once: a second signal must not cut the rollback short.
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    # A signal ignored on purpose (`nohup netemu up`) stays ignored.
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)
           if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def print_summary(name: str, summary: dict) -> None:
    print(f'cluster "{name}" is ready')
    print(printers.table(printers.NODE_HEADERS[:2] + ["INTERNAL-IP", "POD-CIDR"],
                         [printers.node_row(n, True)[:2] + printers.node_row(n, True)[5:7]
                          for n in summary["nodes"]]))
    if summary["pods"]:
        print()
        print(printers.table(printers.POD_HEADERS[:3] + ["IP", "NODE"],
                             [printers.pod_row(p, True)[:3] + printers.pod_row(p, True)[5:7]
                              for p in summary["pods"]]))
    for machine, nodes, command in summary.get("waiting", []):
        print(f"\nmachine {machine} ({', '.join(nodes)}) has not joined yet; on it: {command}")
    print(f"\nTry: netemu get pods -o wide --cluster {name}   |   netemu down {name}")


def cmd_join(args) -> int:
    def progress(line):
        if not args.quiet:
            print(f"  … {line}", file=sys.stderr, flush=True)

    cluster = args.cluster or os.environ.get(names.CLUSTER_ENV)
    if not args.quiet:
        which = f'cluster "{cluster}"' if cluster else "the cluster"
        print(f"Joining {which} in {args.store} as machine {args.machine}", file=sys.stderr)
    with _signals_interrupt():
        summary = clusters.join(cluster, args.store, args.machine, progress)
    print_summary(summary["cluster"], summary)
    return 0


def cmd_down(args) -> int:
    name = clusters.resolve(args.name or args.cluster_opt)

    def progress(line):
        print(f"  … {line}", file=sys.stderr, flush=True)

    clusters.take_down(name, progress)
    print(f'cluster "{name}" removed')
    return 0


def cmd_clean(args) -> int:
    name = args.name or args.cluster_opt or os.environ.get(names.CLUSTER_ENV)
    if not name:
        name = clusters.resolve(None)
    if name not in clusters.running_clusters():
        left = clusters.owned_names_taken(name)
        if left:
            raise clusters.ClusterError(
                f'cluster "{name}" has no state folder, so netemu cannot tell which namespaces are its own; '
                f"remove them by hand if they are: {', '.join(left)}")
        print(f'nothing to clean for "{name}"')
        return 0
    clusters.teardown(name, graceful=False)
    print(f'cluster "{name}" cleaned')
    return 0


def cmd_clusters(args) -> int:
    for name in clusters.running_clusters():
        print(name)
    return 0


def warn(line: str) -> None:
    print(f"netemu: warning: {line}", file=sys.stderr)


def _store(args, writes: bool = False):
    name = clusters.resolve(args.cluster)
    clusters.check_control_plane(name, writes, warn)
    return name, clusters.open_store(name)


def _kind(word: str) -> str:
    try:
        return kinds.resolve(word)
    except KeyError:
        raise CliError(f'the server doesn\'t have a resource type "{word}"') from None


def _not_found(kind: str, name: str):
    """kubectl's NotFound, with the resource named as the API server names it
    (endpoints, jobs.batch), from the one table of kinds (netemu.k8s.kinds)."""
    from netemu.api import ApiError

    return ApiError(f'{kinds.BY_KIND[kind].qualified()} "{name}" not found', reason="NotFound")


def _overlay_stats(store, nodes: list[str]) -> dict[str, dict | None]:
    """The overlay daemons' records of NODES, fresh (asked for; see
    netemu.overlay.stats), from the store."""
    from netemu.overlay import stats
    return stats.collect(store, nodes)


def _selector(args) -> list[dict] | None:
    """The -l requirements (None without -l). A name and a selector together are
    refused, with kubectl's words."""
    if getattr(args, "selector", None) is None:
        return None
    from netemu.k8s import selectors

    if args.names:
        raise CliError("name cannot be provided when a selector is specified")
    try:
        return selectors.parse_label_selector(args.selector)
    except selectors.SelectorError as e:
        raise CliError(str(e)) from None


def _selected(objs: list[dict], requirements: list[dict] | None) -> list[dict]:
    if requirements is None:
        return objs
    from netemu.k8s import selectors

    return [o for o in objs if selectors.labels_match(requirements, o["metadata"].get("labels"))]


def cmd_get(args) -> int:
    if "," in args.kind:
        if args.watch:
            raise CliError("you may only specify a single resource type when watching (-w)")
        # kubectl get svc,ep: one table per kind, a blank line between them
        for i, word in enumerate(args.kind.split(",")):
            if i:
                print()
            cmd_get(argparse.Namespace(**{**vars(args), "kind": word}))
        return 0
    if "/" in args.kind and not args.names:
        args.kind, name = args.kind.split("/", 1)
        args.names = [name]
    kind = _kind(args.kind)
    requirements = _selector(args)
    cluster, store = _store(args)
    ns = None if args.all_namespaces else args.namespace
    # The revision before the list: a watch then reports every change after it.
    since = store.revision()
    if args.names:
        objs = []
        for n in args.names:
            obj = registry.get(store, kind, ns, n)
            if obj is None:
                raise _not_found(kind, n)
            objs.append(obj)
    else:
        objs = _selected(registry.list_(store, kind, ns), requirements)
    printer = _GetPrinter(cluster, store, kind, args)
    if args.output in ("json", "yaml") and not args.watch:
        print(printers.dump(objs, args.output, single=bool(args.names)))
        return 0
    if not objs and not args.watch:
        # kubectl writes this to stderr: a script reading stdout sees no rows.
        print(f"No resources found in {args.namespace} namespace."
              if kinds.BY_KIND[kind].namespaced and not args.all_namespaces else "No resources found", file=sys.stderr)
        return 0
    printer.print(objs)
    if args.watch:
        _watch(store, kind, ns, args.names, requirements, since, printer)
    return 0


class _GetPrinter:
    """Prints `get` output; for a watch, one more row per change, padded to the
    columns of the first table as kubectl's watch output is."""

    def __init__(self, cluster: str, store, kind: str, args):
        self.cluster, self.store, self.kind, self.args = cluster, store, kind, args
        self.widths: list[int] | None = None

    def print(self, objs: list[dict]) -> None:
        args, kind = self.args, self.kind
        if not objs:
            return
        if args.output in ("json", "yaml"):
            for o in objs:
                print(printers.dump([o], args.output, single=True))
            sys.stdout.flush()
            return
        if args.output == "name":
            for o in objs:
                print(kinds.BY_KIND[kind].ref(o['metadata']['name']))
            sys.stdout.flush()
            return
        headers, rows = tabulate(self.cluster, self.store, kind, objs, args.output == "wide")
        if args.all_namespaces and kinds.BY_KIND[kind].namespaced:
            headers = ["NAMESPACE"] + headers
            rows = [[o["metadata"].get("namespace", "default")] + r for o, r in zip(objs, rows)]
        if args.show_labels:
            from netemu.kubectl_tables import format_labels

            headers = headers + ["LABELS"]
            rows = [r + [format_labels(o["metadata"].get("labels"))] for o, r in zip(objs, rows)]
        if self.widths is None:
            text = printers.table(headers, rows)
            self.widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
        else:
            text = "\n".join("   ".join(str(c).ljust(w) for c, w in zip(r, self.widths)).rstrip() for r in rows)
        print(text, flush=True)


WATCH_PERIOD = 0.25


def _watch(store, kind: str, ns: str | None, names_: list[str], requirements, since: int, printer) -> None:
    """kubectl get -w: after the list, print every object of the kind (in the
    namespace, of the names, selected) each time it changes, a deleted one with
    its last state, until interrupted (KeyboardInterrupt ends the command)."""
    import time
    from netemu.store.base import Compacted

    prefix = registry.prefix(kind, ns)
    while True:
        time.sleep(WATCH_PERIOD)
        try:
            events = store.events_since(since, prefix)
        except Compacted:
            # History is gone: list again, as a kubectl watch that expired re-lists.
            since = store.revision()
            events = []
            printer.print(_selected(registry.list_(store, kind, ns), requirements))
        changed = []
        for ev in events:
            since = max(since, ev.revision)
            obj = ev.value
            if not isinstance(obj, dict) or "metadata" not in obj:
                continue
            obj["metadata"]["resourceVersion"] = str(ev.revision)
            if names_ and obj["metadata"].get("name") not in names_:
                continue
            if _selected([obj], requirements):
                changed.append(obj)
        printer.print(changed)


def tabulate(cluster: str, store, kind: str, objs: list[dict], wide: bool):
    if kind == "Pod":
        return (printers.POD_HEADERS + (printers.POD_WIDE if wide else []),
                [printers.pod_row(o, wide) for o in objs])
    if kind == "Node":
        headers = printers.NODE_HEADERS + (printers.NODE_WIDE if wide else [])
        rows = [printers.node_row(o, wide) for o in objs]
        machine = [(o["metadata"].get("labels") or {}).get(names.MACHINE_LABEL) for o in objs]
        if wide and any(machine):
            # a cluster over several machines: where each node runs
            headers = headers + ["MACHINE"]
            rows = [row + [m or "<none>"] for row, m in zip(rows, machine)]
        return headers, rows
    from netemu import kubectl_tables

    if kubectl_tables.supports(kind):
        return kubectl_tables.tabulate(kind, objs, wide, store)
    return (["NAME", "AGE"], [[o["metadata"]["name"], printers.age(o["metadata"].get("creationTimestamp"))]
                             for o in objs])


def cmd_describe(args) -> int:
    if "/" in args.kind:
        args.kind, first = args.kind.split("/", 1)
        args.names = [first] + list(args.names)
    kind = _kind(args.kind)
    requirements = _selector(args)
    cluster, store = _store(args)
    objs = []
    if args.names:
        for name in args.names:
            obj = registry.get(store, kind, args.namespace, name)
            if obj is not None:
                objs.append(obj)
                continue
            # kubectl describe takes a name that is no object's as a prefix
            # (`describe pods nginx` describes nginx-abc12 and nginx-def34).
            matched = [o for o in registry.list_(store, kind, args.namespace)
                       if o["metadata"]["name"].startswith(name)]
            if not matched:
                raise _not_found(kind, name)
            objs.extend(matched)
    else:
        objs = _selected(registry.list_(store, kind, args.namespace), requirements)
        if not objs:
            print(f"No resources found in {args.namespace} namespace." if kinds.BY_KIND[kind].namespaced
                  else "No resources found", file=sys.stderr)
            return 0
    for i, obj in enumerate(objs):
        # kubectl separates the objects' texts by two blank lines.
        print(("\n\n" if i else "") + describe_text(cluster, store, kind, obj))
    return 0


def describe_text(cluster: str, store, kind: str, obj: dict) -> str:
    """The `describe` text of one object."""
    name = obj["metadata"]["name"]
    events = registry.events_for(store, obj)
    if kind == "Pod":
        from netemu.node.sandbox import published
        import dataclasses
        sb = published(obj)
        return printers.describe_pod(obj, events, dataclasses.asdict(sb) if sb else None)
    if kind == "Node":
        pods = [p for p in registry.list_(store, "Pod") if p.get("spec", {}).get("nodeName") == name
                and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
        return printers.describe_node(obj, pods, _overlay_stats(store, [name])[name], events)
    from netemu import kubectl_tables

    try:
        return kubectl_tables.describe(kind, obj, events, store).rstrip("\n")
    except KeyError:           # a kind with no describer: its YAML and events
        return printers.dump([obj], "yaml", single=True) + "\n" + printers.format_events(events)


def _pod(store, namespace: str, name: str) -> dict:
    pod = registry.get(store, "Pod", namespace, name)
    if pod is None:
        raise CliError(f'pods "{name}" not found')
    return pod


def cmd_exec(args) -> int:
    command = args.command
    if not command:
        raise CliError("you must specify at least one command for the container (netemu exec POD -- CMD)")
    cluster, store = _store(args)
    argv, env = pod_exec(cluster, store, args.namespace, args.pod, args.container, command)
    exec_command(argv, env)
    return 0  # not reached


def pod_exec(cluster: str, store, namespace: str, pod_name: str, container: str | None,
             command: list[str]) -> tuple[list[str], dict]:
    """(argv, environment) that run COMMAND in a pod's namespaces as CONTAINER
    (default: the first); shared by `netemu exec` and the Python API. For a
    pod of another machine, the argv is a client of its node's kubelet port
    that exits with the command's status. Raises CliError when the pod, or the
    container, is not there or (here) not running."""
    from netemu import netns
    from netemu.node import sandbox as sandboxes

    pod = _pod(store, namespace, pod_name)
    containers = [c["name"] for c in pod["spec"].get("containers", [])]
    if container and container not in containers:
        raise CliError(f"container {container} is not valid for pod {pod_name} "
                       f"(containers: {', '.join(containers)})")
    from netemu.node import kubeletport
    node = kubeletport.elsewhere(cluster, store, pod)
    if node is not None:
        # A pod of another machine: a client of its node's kubelet port runs
        # the command there (node/kubeletexec.py) and exits with its status.
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            raise CliError(f"pod {pod_name} is not running (status {printers.pod_status_word(pod)})")
        address = kubeletport.internal_ip(node)
        try:
            if address is None:
                raise kubeletport.KubeletError(f"node {node['metadata']['name']} has no InternalIP to reach its "
                                               "kubelet port at")
            here = kubeletport.local_node_ns(cluster, store)
        except kubeletport.KubeletError as e:
            raise CliError(str(e)) from None
        return [sys.executable, "-m", "netemu.node.kubeletexec", here, address, namespace, pod_name,
                container or containers[0], "--", *command], dict(os.environ)
    # What the pod's kubelet published on it (not its file), checked against the kernel.
    pause_pid = sandboxes.pause_pid_of(cluster, pod)
    if pause_pid is None or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        raise CliError(f"pod {pod_name} is not running (status {printers.pod_status_word(pod)})")
    env = dict(os.environ, HOSTNAME=pod_name, NETEMU_POD=f"{namespace}/{pod_name}")
    env[names.CLUSTER_ENV] = cluster
    env["NETEMU_CONTAINER"] = container or containers[0]
    return netns.exec_argv(names.pod_ns(cluster, namespace, pod_name), command, uts_pid=pause_pid), env


def _pod_for_logs(store, namespace: str, ref: str) -> str:
    """The pod `logs REF` reads: NAME, pod/NAME, or KIND/NAME of a workload, whose
    pods are ranked as kubectl ranks them (podutils.ByLogging: on a node,
    running, ready, most restarts, newest) and the first one taken."""
    word, sep, name = ref.partition("/")
    if not sep:
        return ref
    kind = _kind(word)
    if kind == "Pod":
        return name
    if kind not in kinds.WORKLOADS:
        raise CliError(f"cannot get the logs of a {kinds.BY_KIND[kind].singular}: give a pod, or a job, rc, rs, "
                       "deployment or daemonset")
    from netemu.k8s import selectors

    owner = registry.get(store, kind, namespace, name)
    if owner is None:
        raise _not_found(kind, name)
    selector = selectors.workload_selector(owner)
    pods = [p for p in registry.list_(store, "Pod", namespace)
            if selectors.matches(selector, p["metadata"].get("labels"))]
    if not pods:
        raise CliError(f"no pods of {kinds.BY_KIND[kind].singular}/{name} (selector "
                       f"{selectors.format_selector(selector)})")

    def rank(p):
        status = p.get("status") or {}
        statuses = status.get("containerStatuses") or []
        phase = {"Running": 0, "Unknown": 1, "Pending": 2}.get(status.get("phase"), 3)
        return (not (p.get("spec") or {}).get("nodeName"), phase, not all(c.get("ready") for c in statuses),
                -sum(c.get("restartCount", 0) for c in statuses))
    # newest first among equals: sort by age first, the sort by rank is stable
    pods.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True)
    pods.sort(key=rank)
    if len(pods) > 1:
        print(f"Found {len(pods)} pods, using pod/{pods[0]['metadata']['name']}", file=sys.stderr)
    return pods[0]["metadata"]["name"]


FOLLOW_PERIOD = 0.2


def exec_command(argv: list[str], env: dict) -> None:
    """Replace this process with ARGV. Python ignores SIGPIPE and an ignored
    signal stays ignored across exec: put the default back, so that the command
    (`netemu exec POD -- yes | head -1`) ends quietly when its reader goes away,
    as it would in a container, instead of failing on EPIPE with a message."""
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.execvpe(argv[0], argv, env)


def cmd_logs(args) -> int:
    cluster, store = _store(args)
    finished = None                      # for -f: has the writer stopped for good?
    if args.pod.startswith(("node/", "nodes/", "no/")):
        node = args.pod.split("/", 1)[1]
        if args.previous:
            raise CliError("--previous is for containers; a node daemon's log is one file")
        daemon = args.daemon or "overlay"
        if daemon not in ("overlay", "proxy", "kubelet", "agent"):
            raise CliError(f'a node has no daemon "{daemon}" (overlay, proxy, kubelet or agent)')
        # The node agent's parts each log to their own file; agent.log is the
        # agent's own (part restarts, anything no part claims).
        path = os.path.join(names.node_dir(cluster, node), f"{daemon}.log")
    else:
        from netemu.node import kubeletport
        pod_name, container, pod, path = container_log(cluster, store, args.namespace, args.pod,
                                                        args.container or args.daemon)
        node = kubeletport.elsewhere(cluster, store, pod)
        if node is not None:
            return _remote_log(cluster, store, node, args, pod_name, container)
        if args.previous:
            pod_name, container, pod, path = container_log(cluster, store, args.namespace, pod_name, container,
                                                            previous=True)
            finished = lambda: True      # noqa: E731 - a previous instance writes no more
        else:
            uid = pod["metadata"].get("uid")
            first_inode = _inode(path)

            def finished() -> bool:
                """kubectl logs -f ends with the container: the pod is gone (or
                replaced), the container no longer runs, or its log was moved
                aside for a new instance."""
                now = registry.get(store, "Pod", args.namespace, pod_name)
                if now is None or now["metadata"].get("uid") != uid or _inode(path) != first_inode:
                    return True
                state = next((c.get("state") or {} for c in (now.get("status") or {}).get("containerStatuses", [])
                              if c.get("name") == container), {})
                return "running" not in state
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CliError(f"no log yet at {path}") from None
    with f:
        data = f.read()
        if args.tail >= 0:
            data = b"\n".join(data.splitlines()[-args.tail:]) + b"\n" if args.tail else b""
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        if not args.follow:
            return 0
        import time
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            if finished is not None and finished():
                sys.stdout.buffer.write(f.read())      # what came between the last read and the check
                return 0
            time.sleep(FOLLOW_PERIOD)


def _remote_log(cluster: str, store, node: dict, args, pod: str, container: str) -> int:
    """`logs` of a pod on another machine: asked of its node's kubelet port
    (node/kubeletport.py), as the API server asks it."""
    from netemu.node import kubeletport

    query = {"follow": ["true" if args.follow else "false"], "previous": ["true" if args.previous else "false"]}
    if args.tail >= 0:
        query["tailLines"] = [str(args.tail)]
    try:
        resp = kubeletport.open_log(cluster, store, node, args.namespace, pod, container, query)
    except kubeletport.KubeletError as e:
        raise CliError(str(e)) from None
    try:
        if resp.status != 200:
            body = resp.read()
            try:
                message = json.loads(body)["message"]
            except (ValueError, KeyError, TypeError):
                message = body.decode(errors="replace").strip()
            raise CliError(message)
        while chunk := resp.read1(1 << 16):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    finally:
        resp.close()
    return 0


def container_log(cluster: str, store, namespace: str, ref: str, container: str | None,
                  previous: bool = False) -> tuple[str, str, dict, str]:
    """(pod name, container, pod, log file) that `logs REF [-c CONTAINER] [-p]`
    reads; shared by `netemu logs` and the Python API. CONTAINER None: the only
    one (several: an error, as kubectl's)."""
    pod_name = _pod_for_logs(store, namespace, ref)
    pod = _pod(store, namespace, pod_name)
    containers = [c["name"] for c in pod["spec"].get("containers", [])]
    if container is None:
        if len(containers) > 1:
            raise CliError(f"a container name must be specified for pod {pod_name}, "
                           f"choose one of: [{' '.join(containers)}]")
        container = containers[0]
    elif container not in containers:
        raise CliError(f"container {container} is not valid for pod {pod_name}")
    pod_dir = names.pod_dir(cluster, namespace, pod_name)
    path = names.container_log(pod_dir, container, previous)
    if previous:
        if not os.path.exists(path):
            from netemu.api import ApiError
            raise ApiError(f'previous terminated container "{container}" in pod "{pod_name}" not found',
                           reason="BadRequest")
    return pod_name, container, pod, path


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def cmd_stats(args) -> int:
    cluster, store = _store(args)
    nodes = [args.node] if args.node else [n["metadata"]["name"] for n in registry.list_(store, "Node")]
    for node in nodes:
        if registry.get(store, "Node", None, node) is None:
            raise CliError(f'nodes "{node}" not found')
    result = _overlay_stats(store, nodes)
    if args.output == "json":
        print(json.dumps(result, indent=2))
        return 0
    keys = sorted({k for s in result.values() if s for k in s.get("counters", {})})
    if args.output != "wide":
        # The malformed datagrams by reason add up to DROP_MALFORMED: -o wide shows them.
        keys = [k for k in keys if not k.startswith("malformed_")]
    rows = [[node, (s or {}).get("backend", "-"), (s or {}).get("subnet", "-")] +
            [str((s or {}).get("counters", {}).get(k, "")) for k in keys] for node, s in result.items()]
    print(printers.table(["NODE", "BACKEND", "SUBNET"] + [k.upper() for k in keys], rows))
    return 0


def cmd_node(args) -> int:
    name = clusters.resolve(args.cluster)
    clusters.check_control_plane(name, True, warn)
    if args.action == "remove":
        clusters.remove_node(name, args.name)
        print(f'node "{args.name}" removed')
        return 0
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--label {item}: expected KEY=VALUE")
        labels[key] = value
    address = clusters.add_node(name, args.name, labels, args.address, args.pod_cidr, args.unschedulable)
    store = clusters.open_store(name)
    try:
        node = clusters.wait_node_ready(store, args.name)
    finally:
        store.close()
    print(f'node "{args.name}" added: eth0 {address}, pod CIDR {node["spec"].get("podCIDR")}')
    return 0


def cmd_client(args) -> int:
    from netemu import netns

    command = args.command
    if not command:
        raise CliError("usage: netemu client exec -- CMD")
    cluster = clusters.resolve(args.cluster)
    argv = netns.exec_argv(names.client_ns(cluster), command)
    env = dict(os.environ)
    env[names.CLUSTER_ENV] = cluster
    exec_command(argv, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
