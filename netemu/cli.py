"""The netemu command: kubectl's verbs for an emulated cluster, plus up/down/clean.

Exit status: 0 on success, 1 on an error (one line saying what and where), 2 on
bad usage (argparse's own convention).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from netemu import cluster as clusters, names, printers
from netemu.store import registry
from netemu.store.base import Conflict


class CliError(Exception):
    pass


def _topology_error():
    from netemu.topology.model import TopologyError
    return TopologyError


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
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

    sp = with_cluster(verb("describe", cmd_describe, "show one object in detail"))
    sp.add_argument("kind")
    sp.add_argument("name")
    sp.add_argument("-n", "--namespace", default="default")

    sp = with_cluster(verb("exec", cmd_exec, "run a command in a pod's namespaces: netemu exec POD [-c C] -- CMD"))
    sp.add_argument("pod")
    sp.add_argument("-c", "--container")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("-i", "--stdin", action="store_true", help="accepted for kubectl compatibility")
    sp.add_argument("-t", "--tty", action="store_true", help="accepted for kubectl compatibility")
    sp.add_argument("command", nargs="*", help="the command (after --)")

    sp = with_cluster(verb("logs", cmd_logs, "print a container's output, or a node daemon's log "
                                             "(logs node/NAME overlay|proxy|kubelet)"))
    sp.add_argument("pod")
    sp.add_argument("daemon", nargs="?")
    sp.add_argument("-c", "--container")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("--tail", type=int, default=-1)

    sp = with_cluster(verb("stats", cmd_stats, "the overlay daemon's counters of a node (or all nodes)"))
    sp.add_argument("node", nargs="?")
    sp.add_argument("-o", "--output", choices=["json"])

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
    quiet = args.quiet

    def progress(line):
        if not quiet:
            print(f"  … {line}", file=sys.stderr, flush=True)

    if not quiet:
        print(f'Building cluster "{topo.name}" from {args.file} (backend {topo.settings.backend}, '
              f'proxy {topo.settings.proxy_mode})', file=sys.stderr)
    summary = clusters.up(topo, progress)
    print_summary(topo.name, summary)
    return 0


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
    print(f"\nTry: netemu get pods -o wide --cluster {name}   |   netemu down {name}")


def cmd_down(args) -> int:
    name = clusters.resolve(args.name or args.cluster_opt)
    clusters.teardown(name, graceful=True)
    print(f'cluster "{name}" removed')
    return 0


def cmd_clean(args) -> int:
    name = args.name or args.cluster_opt or os.environ.get(names.CLUSTER_ENV)
    if not name:
        name = clusters.resolve(None)
    if name not in clusters.running_clusters():
        left = [ns for ns in __import__("netemu.netns", fromlist=["x"]).list_all()
                if ns.startswith(f"{name}-")]
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


def _store(args):
    name = clusters.resolve(args.cluster)
    return name, clusters.open_store(name)


def _kind(word: str) -> str:
    try:
        return registry.kind_of(word)
    except KeyError:
        raise CliError(f'the server doesn\'t have a resource type "{word}"') from None


def _not_found(kind: str, name: str):
    """kubectl's NotFound, with the resource named as the API server names it
    (endpoints, jobs.batch), from the one table of kinds (netemu.k8s.kinds)."""
    from netemu.api import ApiError
    from netemu.k8s import kinds

    return ApiError(f'{kinds.BY_KIND[kind].qualified()} "{name}" not found', reason="NotFound")


def _overlay_stats(cluster: str, node: str) -> dict | None:
    from netemu.overlay.daemon import read_stats
    return read_stats(names.node_dir(cluster, node))


def cmd_get(args) -> int:
    if "," in args.kind:
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
    cluster, store = _store(args)
    ns = None if args.all_namespaces else args.namespace
    if args.names:
        objs = []
        for n in args.names:
            obj = registry.get(store, kind, ns, n)
            if obj is None:
                raise _not_found(kind, n)
            objs.append(obj)
    else:
        objs = registry.list_(store, kind, ns)
    if args.output in ("json", "yaml"):
        print(printers.dump(objs, args.output, single=bool(args.names)))
        return 0
    if args.output == "name":
        for o in objs:
            print(f"{registry.kind_word(kind)}/{o['metadata']['name']}")
        return 0
    if not objs:
        print(f"No resources found in {args.namespace} namespace." if registry.KINDS[kind][1]
              else "No resources found")
        return 0
    wide = args.output == "wide"
    headers, rows = tabulate(cluster, store, kind, objs, wide)
    if args.all_namespaces and registry.KINDS[kind][1]:
        headers = ["NAMESPACE"] + headers
        rows = [[o["metadata"].get("namespace", "default")] + r for o, r in zip(objs, rows)]
    print(printers.table(headers, rows))
    return 0


def tabulate(cluster: str, store, kind: str, objs: list[dict], wide: bool):
    if kind == "Pod":
        return (printers.POD_HEADERS + (printers.POD_WIDE if wide else []),
                [printers.pod_row(o, wide) for o in objs])
    if kind == "Node":
        return (printers.NODE_HEADERS + (printers.NODE_WIDE if wide else []),
                [printers.node_row(o, wide, _overlay_stats(cluster, o["metadata"]["name"])) for o in objs])
    from netemu import kubectl_tables

    if kubectl_tables.supports(kind):
        return kubectl_tables.tabulate(kind, objs, wide, store)
    return (["NAME", "AGE"], [[o["metadata"]["name"], printers.age(o["metadata"].get("creationTimestamp"))]
                             for o in objs])


def cmd_describe(args) -> int:
    if "/" in args.kind:
        args.kind, args.name = args.kind.split("/", 1)[0], args.kind.split("/", 1)[1]
    kind = _kind(args.kind)
    cluster, store = _store(args)
    obj = registry.get(store, kind, args.namespace, args.name)
    if obj is None:
        raise _not_found(kind, args.name)
    events = registry.events_for(store, obj)
    if kind == "Pod":
        from netemu.node.sandbox import Sandbox
        import dataclasses
        sb = Sandbox.load(names.pod_dir(cluster, obj["metadata"].get("namespace", "default"), args.name))
        print(printers.describe_pod(obj, events, dataclasses.asdict(sb) if sb else None))
    elif kind == "Node":
        pods = [p for p in registry.list_(store, "Pod") if p.get("spec", {}).get("nodeName") == args.name
                and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
        print(printers.describe_node(obj, pods, _overlay_stats(cluster, args.name), events))
    else:
        from netemu import kubectl_tables

        try:
            print(kubectl_tables.describe(kind, obj, events, store))
        except KeyError:           # a kind with no describer: its YAML and events
            print(printers.dump([obj], "yaml", single=True))
            print(printers.format_events(events))
    return 0


def _pod(store, namespace: str, name: str) -> dict:
    pod = registry.get(store, "Pod", namespace, name)
    if pod is None:
        raise CliError(f'pods "{name}" not found')
    return pod


def cmd_exec(args) -> int:
    from netemu import netns
    from netemu.node.sandbox import Sandbox

    command = args.command
    if not command:
        raise CliError("you must specify at least one command for the container (netemu exec POD -- CMD)")
    cluster, store = _store(args)
    pod = _pod(store, args.namespace, args.pod)
    containers = [c["name"] for c in pod["spec"].get("containers", [])]
    if args.container and args.container not in containers:
        raise CliError(f"container {args.container} is not valid for pod {args.pod} "
                       f"(containers: {', '.join(containers)})")
    sb = Sandbox.load(names.pod_dir(cluster, args.namespace, args.pod))
    if sb is None or not sb.pause_pid or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        raise CliError(f"pod {args.pod} is not running (status {printers.pod_status_word(pod)})")
    env = dict(os.environ, HOSTNAME=args.pod, NETEMU_POD=f"{args.namespace}/{args.pod}")
    env[names.CLUSTER_ENV] = cluster
    env["NETEMU_CONTAINER"] = args.container or containers[0]
    argv = netns.exec_argv(sb.namespace, command, uts_pid=sb.pause_pid)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def cmd_logs(args) -> int:
    cluster, store = _store(args)
    if args.pod.startswith(("node/", "nodes/", "no/")):
        node = args.pod.split("/", 1)[1]
        daemon = args.daemon or "overlay"
        path = os.path.join(names.node_dir(cluster, node), f"{daemon}.log")
        if daemon == "kubelet":
            path = os.path.join(names.state_dir(cluster), "controlplane.log")
    else:
        pod = _pod(store, args.namespace, args.pod)
        containers = [c["name"] for c in pod["spec"].get("containers", [])]
        container = args.container
        if container is None:
            if len(containers) > 1:
                raise CliError(f"a container name must be specified for pod {args.pod}, "
                               f"choose one of: [{' '.join(containers)}]")
            container = containers[0]
        elif container not in containers:
            raise CliError(f"container {container} is not valid for pod {args.pod}")
        path = os.path.join(names.pod_dir(cluster, args.namespace, args.pod), f"{container}.log")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CliError(f"no log yet at {path}") from None
    if args.tail >= 0:
        data = b"\n".join(data.splitlines()[-args.tail:]) + b"\n" if args.tail else b""
    sys.stdout.buffer.write(data)
    return 0


def cmd_stats(args) -> int:
    cluster, store = _store(args)
    nodes = [args.node] if args.node else [n["metadata"]["name"] for n in registry.list_(store, "Node")]
    result = {}
    for node in nodes:
        if registry.get(store, "Node", None, node) is None:
            raise CliError(f'nodes "{node}" not found')
        result[node] = _overlay_stats(cluster, node)
    if args.output == "json":
        print(json.dumps(result, indent=2))
        return 0
    keys = sorted({k for s in result.values() if s for k in s.get("counters", {})})
    rows = [[node, (s or {}).get("backend", "-"), (s or {}).get("subnet", "-")] +
            [str((s or {}).get("counters", {}).get(k, "")) for k in keys] for node, s in result.items()]
    print(printers.table(["NODE", "BACKEND", "SUBNET"] + [k.upper() for k in keys], rows))
    return 0


def cmd_node(args) -> int:
    name = clusters.resolve(args.cluster)
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
    os.execvpe(argv[0], argv, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
