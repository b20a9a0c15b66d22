"""`netemu link set|show`: a node uplink's impairment at run time, and what
impairs every link (node uplinks, and pods' own links).

`link set NODE --rate 10mbit --loss 1%` changes the properties given and keeps
the others; `--clear` removes them all. The setting is written into the
cluster's settings in its store (netemu.clusterconfig, compare-and-swap: a
`node add` meanwhile is not lost; so `link show` and a node's later rebuild
know it) and put on the kernel at once, on both ends of the uplink (netemu.link.Link.impair).
set_link and show do the work and return what they did; the Python API
(netemu.scripting: Cluster.link, Cluster.links) calls them too.

A pod's own link (its eth0 and its vethXXXXXXX on docker0) is impaired by the
kubelet from the pod's netemu.io/link annotation when it builds the sandbox
(netemu.node.sandbox); `link show` lists it from the store (the pod's
annotation, node and uid, which name its two ends) and reads what is installed
from the kernel, as for an uplink. It is not set with `link set`.
"""

from __future__ import annotations

import json

from netemu import clusterconfig, impairment, link, machines, names, netns, printers
from netemu import cluster as clusters
from netemu.impairment import Impairment, ImpairmentError
from netemu.store import registry

FLAGS = ("rate", "loss", "delay", "jitter", "duplicate", "reorder", "limit", "corrupt")


def register(sub, verb, with_cluster) -> None:
    sp = with_cluster(verb("link", cmd_link, "impair a node's uplink, or show what impairs the links: "
                                             "netemu link set NODE [--rate 100mbit] [--loss 1%%] ... | --clear; "
                                             "netemu link show [NODE | pod/POD [-n NAMESPACE]] [-o json]"))
    sp.add_argument("action", choices=["set", "show"])
    sp.add_argument("node", nargs="?", help="a node (its uplink), or pod/NAME (show only: the pod's own link)")
    sp.add_argument("-n", "--namespace", default=None, help="the namespace of pod/NAME (default: default)")
    sp.add_argument("--rate", help="bandwidth in tc's units (100mbit, 1gbit, 500kbit); 0 for none")
    sp.add_argument("--loss", help="packets dropped, in percent (1%%, 0.01%%)")
    sp.add_argument("--duplicate", help="packets sent twice, in percent")
    sp.add_argument("--limit", help="queue limit in packets (with --rate)")
    sp.add_argument("--delay", help="one-way delay, each direction (20ms, 500us): netemu's delay line; "
                                    "0 for none (and no jitter or reorder)")
    sp.add_argument("--jitter", help="delay spread, +- around --delay (5ms); order is kept")
    sp.add_argument("--reorder", help="share of frames sent at once, ahead of the delayed ones (25%%; "
                                      "needs --delay)")
    sp.add_argument("--corrupt", help="not supported on this kernel (no netem)")
    sp.add_argument("--clear", action="store_true", help="remove every impairment of the link")
    sp.add_argument("-o", "--output", choices=["json"])


def _uplink(cluster: str, node: str, settings):
    from netemu.node import host
    return host.uplink(cluster, node, settings.underlay_mtu)


def _node(topology, name: str):
    for n in topology.nodes:
        if n.name == name:
            clusters.require_here(topology, n)
            return n
    raise clusters.ClusterError(f'nodes "{name}" not found')


def merged(current: Impairment, given: dict, flag: str = "--") -> Impairment:
    """CURRENT with the properties GIVEN over it (pure). A property refused by
    this kernel is reported as FLAG + its name: "--delay: not supported: ..."
    (the API passes "" : its keyword is the property's name)."""
    props = current.settings()
    for key, value in given.items():
        if key == "rate" and str(value).strip() == "0":
            props.pop("rate", None)
            props.pop("limit", None)        # a queue limit lives under the rate
        elif key == "delay" and str(value).strip() == "0":
            for gone in ("delay", "jitter", "reorder"):     # they live on the delay line
                props.pop(gone, None)
        else:
            props[key] = value
    try:
        return impairment.parse(props)
    except ImpairmentError as e:
        raise ImpairmentError(f"{flag}{e.where}: {e.problem}") from None


def set_link(cluster: str, node: str, given: dict | None, flag: str = "--") -> Impairment:
    """Set NODE's uplink: the properties GIVEN over its current ones (None:
    clear them all), on the kernel and in the cluster's settings; returns the
    link's new impairment. `link set` and the Python API's Cluster.link."""
    done: list[Impairment] = []

    def change(topology) -> None:
        # Run again on fresh settings if another writer got there first, so
        # that the kernel ends with what is stored.
        settings = topology.settings
        spec = _node(topology, node)
        new = Impairment() if given is None else merged(spec.uplink(settings), given, flag)
        try:
            _uplink(cluster, spec.name, settings).impair(new)
        except netns.NetnsError as e:
            raise clusters.ClusterError(f"link {spec.name}: {' '.join(str(e).split())}") from None
        spec.link = new
        done[:] = [new]

    clusterconfig.update(cluster, change)
    return done[0]


def show(cluster: str, node: str | None = None, *, pod: str | None = None,
         namespace: str | None = None) -> dict:
    """As `link show -o json` prints it. Every node's uplink by node name,
    then every pod's own link (pods annotated netemu.io/link) as
    "pod/NAMESPACE/NAME"; NODE: that node's uplink only; POD (in NAMESPACE,
    default "default"): that pod's link only. Each is {"settings",
    "mechanisms", "installed"}: installed per end ("NAMESPACE/DEVICE") as
    read from the kernel. A pod's also has "pod", "namespace", "node" and
    "ends" (near: its veth in the node, far: its eth0)."""
    if node is not None and pod is not None:
        raise ValueError("link show: a node or a pod, not both")
    lines = link.running_delay_lines()
    result = {}
    if pod is None:
        topology = clusterconfig.read(cluster)
        settings = topology.settings
        for spec in [_node(topology, node)] if node else topology.nodes_on(machines.name(cluster)):
            imp = spec.uplink(settings)
            try:
                installed = _uplink(cluster, spec.name, settings).installed(lines)
            except netns.NetnsError as e:
                raise clusters.ClusterError(f"link {spec.name}: {' '.join(str(e).split())}") from None
            result[spec.name] = {"settings": imp.settings(), "mechanisms": imp.mechanisms(),
                                 "installed": installed}
        if node:
            return result
    store = clusters.open_store(cluster)
    try:
        if pod is not None:
            obj = registry.get(store, "Pod", namespace or "default", pod)
            if obj is None:
                raise clusters.ClusterError(f'pods "{pod}" not found')
            pods = [obj]
        else:
            pods = [p for p in registry.list_(store, "Pod", None)
                    if impairment.POD_ANNOTATION in (p["metadata"].get("annotations") or {})]
    finally:
        store.close()
    for obj in sorted(pods, key=lambda p: (p["metadata"].get("namespace") or "default", p["metadata"]["name"])):
        meta = obj["metadata"]
        ns, name = meta.get("namespace") or "default", meta["name"]
        result[f"pod/{ns}/{name}"] = pod_link(cluster, obj, lines)
    return result


def pod_link(cluster: str, pod: dict, lines: dict) -> dict:
    """One pod's own link, as show lists it: its annotation's settings (the
    API server checked it on write) and what the kernel holds on its two
    ends. A pod not yet on a node has no ends; a sandbox not built (or gone)
    has None for an end."""
    meta = pod["metadata"]
    ns, name = meta.get("namespace") or "default", meta["name"]
    text = str((meta.get("annotations") or {}).get(impairment.POD_ANNOTATION) or "")
    try:
        imp = impairment.parse_words(text, f"metadata.annotations[{impairment.POD_ANNOTATION}]") \
            if text.strip() else Impairment()
    except ImpairmentError as e:
        imp, problem = Impairment(), str(e)
    else:
        problem = None
    node = (pod.get("spec") or {}).get("nodeName") or None
    entry = {"pod": name, "namespace": ns, "node": node, "settings": imp.settings(),
             "mechanisms": imp.mechanisms(), "ends": [], "installed": {}}
    if problem:
        entry["problem"] = problem
    if node and meta.get("uid"):
        near = link.End(names.node_ns(cluster, node), names.pod_veth(ns, name, meta["uid"]))
        far = link.End(names.pod_ns(cluster, ns, name), names.POD_IFACE)
        entry["ends"] = [f"{near.namespace}/{near.name}", f"{far.namespace}/{far.name}"]
        try:
            entry["installed"] = link.Link(near=near, far=far, mtu=0, cluster=cluster).installed(lines)
        except netns.NetnsError as e:
            raise clusters.ClusterError(f"link pod/{ns}/{name}: {' '.join(str(e).split())}") from None
    return entry


def cmd_link(args) -> int:
    cluster = clusters.resolve(args.cluster)
    topology = clusterconfig.read(cluster)
    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    if args.action == "show":
        if given or args.clear:
            raise ValueError("link show takes no impairment flags (use link set)")
        if args.node and args.node.startswith("pod/"):
            return _print(show(cluster, pod=args.node[len("pod/"):], namespace=args.namespace), args.output)
        if args.namespace is not None:
            raise ValueError("-n/--namespace: only with pod/NAME")
        return _print(show(cluster, args.node), args.output)
    if args.namespace is not None:
        raise ValueError("link set: -n/--namespace is for link show pod/NAME (a pod's link is its "
                         "netemu.io/link annotation)")
    if args.node and args.node.startswith("pod/"):
        raise ValueError("link set: a pod's link is set by its netemu.io/link annotation, when its sandbox "
                         "is built (not by link set)")
    if not args.node:
        raise ValueError("usage: netemu link set NODE [--rate R] [--delay D] [--jitter J] [--reorder P] "
                         "[--loss P] [--duplicate P] [--limit N] | --clear")
    _node(topology, args.node)
    if args.clear and given:
        raise ValueError("--clear: takes no other impairment flag")
    if not args.clear and not given:
        raise ValueError("link set: nothing to set (give --rate, --delay, --jitter, --reorder, --loss, --duplicate, "
                         "--limit or --clear)")
    new = set_link(cluster, args.node, None if args.clear else given)
    print(f'link "{args.node}" ' + (" ".join(f"{k}={v}" for k, v in new.settings().items()) or "cleared"))
    return 0


def _print(result: dict, output) -> int:
    if output == "json":
        print(json.dumps(result, indent=2))
        return 0
    rows = []
    for name, r in result.items():
        ends = [end for end in r["installed"].values()]
        if "pod" in r and r["node"] is None:
            state = " (not installed: the pod is not on a node yet)"
        elif "pod" in r and (not ends or any(end is None for end in ends)):
            state = " (not installed: the pod has no sandbox)"
        else:
            state = ""
        if r.get("problem"):
            rows.append([name, "<invalid>", r["problem"], ""])
        elif not r["settings"]:
            rows.append([name, "<none>", "", state.strip(" ()")])
        # A delay line that is not running holds the link's frames: say so.
        dead = any(end is not None and end["delayLine"] is None for end in ends)
        for key, value in r["settings"].items():
            mechanism = r["mechanisms"][key] + state
            if key in ("delay", "jitter", "reorder") and dead and not state:
                mechanism += (" NOT RUNNING: the link is cut until the control plane restarts it "
                              "(within a second while it runs)")
            rows.append([name, key, value, mechanism])
    print(printers.table(["LINK", "PROPERTY", "VALUE", "MECHANISM"], rows))
    return 0
