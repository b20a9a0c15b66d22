"""`netemu link set|show`: a node uplink's impairment at run time.

`link set NODE --rate 10mbit --loss 1%` changes the properties given and keeps
the others; `--clear` removes them all. The setting is written into the
cluster's settings in its store (netemu.clusterconfig, compare-and-swap: a
`node add` meanwhile is not lost; so `link show` and a node's later rebuild
know it) and put on the kernel at once, on both ends of the uplink (netemu.link.Link.impair).
set_link and show do the work and return what they did; the Python API
(netemu.scripting: Cluster.link, Cluster.links) calls them too.
"""

from __future__ import annotations

import json

from netemu import clusterconfig, impairment, netns, printers
from netemu import cluster as clusters
from netemu.impairment import Impairment, ImpairmentError

FLAGS = ("rate", "loss", "delay", "jitter", "duplicate", "reorder", "limit", "corrupt")


def register(sub, verb, with_cluster) -> None:
    sp = with_cluster(verb("link", cmd_link, "impair a node's uplink, or show what impairs it: "
                                             "netemu link set NODE [--rate 100mbit] [--loss 1%] ... | --clear; "
                                             "netemu link show [NODE] [-o json]"))
    sp.add_argument("action", choices=["set", "show"])
    sp.add_argument("node", nargs="?")
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


def show(cluster: str, node: str | None = None) -> dict:
    """NODE's uplink (None: every node's) as `link show -o json` prints it:
    {node: {"settings", "mechanisms", "installed"}}."""
    topology = clusterconfig.read(cluster)
    settings = topology.settings
    result = {}
    for spec in [_node(topology, node)] if node else topology.nodes:
        imp = spec.uplink(settings)
        try:
            installed = _uplink(cluster, spec.name, settings).installed()
        except netns.NetnsError as e:
            raise clusters.ClusterError(f"link {spec.name}: {' '.join(str(e).split())}") from None
        result[spec.name] = {"settings": imp.settings(), "mechanisms": imp.mechanisms(),
                             "installed": installed}
    return result


def cmd_link(args) -> int:
    cluster = clusters.resolve(args.cluster)
    topology = clusterconfig.read(cluster)
    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    if args.action == "show":
        if given or args.clear:
            raise ValueError("link show takes no impairment flags (use link set)")
        return _print(show(cluster, args.node), args.output)
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
    for node, r in result.items():
        if not r["settings"]:
            rows.append([node, "<none>", "", ""])
        # A delay line that is not running holds the link's frames: say so.
        dead = any(end["delayLine"] is None for end in r["installed"].values())
        for key, value in r["settings"].items():
            mechanism = r["mechanisms"][key]
            if key in ("delay", "jitter", "reorder") and dead:
                mechanism += " NOT RUNNING: the link is cut (link set --clear, then set it again)"
            rows.append([node, key, value, mechanism])
    print(printers.table(["NODE", "PROPERTY", "VALUE", "MECHANISM"], rows))
    return 0
