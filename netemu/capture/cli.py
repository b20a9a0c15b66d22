"""The capture verbs of the netemu command: capture, decode, trace, graph.

netemu.cli's build_parser calls `register(sub, verb, with_cluster)`; each verb
here is a thin layer over netemu.capture.{tcpdump, decode, trace, graph}.

    netemu capture TARGET [-i IFACE] [-w FILE.pcap] [-c N] [--duration S] [--decode] [FILTER...]
    netemu capture machine/NAME [-w FILE.pcap] [-c N] [--duration S] [FILTER...]   (both layers)
    netemu decode FILE.pcap [--port-udp N] [--port-vxlan N]
    netemu trace SRC DEST [--port N] [--proto tcp|udp|icmp] [-o FILE.svg|FILE.png]
    netemu graph [-o FILE.svg|FILE.png]
"""

from __future__ import annotations

import argparse
import os
import sys

from netemu import cluster as clusters, names


class CaptureCliError(ValueError):
    """Bad input to a capture verb (netemu.cli prints ValueErrors as one line)."""


def register(sub, verb, with_cluster) -> None:
    """Add capture, decode, trace and graph to the netemu command's subparsers."""
    sp = with_cluster(verb("capture", cmd_capture,
                           "tcpdump at any hop: TARGET is a pod (pod/NAME or NAME), a node, "
                           "fabric, client, lb, or machine/NAME (the tunnel to another machine: "
                           "its inner frames and its outer datagrams)"))
    sp.add_argument("target")
    _capture_options(sp)
    # REMAINDER: the filter is the rest of the line, options included (argparse
    # cannot take options after a '*' positional); cmd_capture sorts them out.
    sp.add_argument("filter", nargs=argparse.REMAINDER,
                    help="tcpdump filter expression (options may come before or after it)")

    sp = verb("decode", cmd_decode, "decode a pcap file: outer/inner headers of each packet, "
                                    "then the flows with their encapsulation overhead")
    sp.set_defaults(needs_root=False)
    sp.add_argument("file", metavar="FILE.pcap")
    sp.add_argument("--port-udp", type=int, action="append", default=[], metavar="N",
                    help="UDP port carrying flannel-udp packets (8285 is always known)")
    sp.add_argument("--port-vxlan", type=int, action="append", default=[], metavar="N",
                    help="UDP port carrying VXLAN (8472 is always known)")
    sp.add_argument("--flows-only", action="store_true", help="print only the flow summary")

    sp = with_cluster(verb("trace", cmd_trace,
                           "send one probe and show it at every hop of its path and its reply's"))
    sp.add_argument("source", metavar="SRC", help="a pod (NAME, pod/NAME, NAMESPACE/NAME), or client")
    sp.add_argument("dest", metavar="DEST",
                    help="a pod or a service (NAME, pod/NAME, svc/NAME; NAMESPACE/NAME or svc/NAMESPACE/NAME "
                         "for another namespace than -n's), a ClusterIP, NODE:NODEPORT or an external IP")
    sp.add_argument("--port", type=int)
    sp.add_argument("--proto", choices=["tcp", "udp", "icmp"], default="tcp")
    sp.add_argument("-o", "--output", metavar="FILE.svg|FILE.png",
                    help="also draw the path (SVG or PNG, by the name's ending)")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the reply")
    sp.add_argument("--keep-pcaps", metavar="DIR", help="keep the per-hop captures in DIR")

    sp = with_cluster(verb("graph", cmd_graph, "the cluster's layout: fabric, nodes, bridges, pods, "
                                               "services (as text, or a picture with -o: SVG or PNG by the name's ending)"))
    sp.add_argument("-o", "--output", metavar="FILE.svg|FILE.png")


def _capture_options(sp, suppress: bool = False) -> None:
    default = argparse.SUPPRESS if suppress else None
    sp.add_argument("-i", "--interface", default=default,
                    help="interface (default: eth0; fabric0 on the fabric)")
    sp.add_argument("-w", "--write", metavar="FILE.pcap", default=default, help="write packets to a pcap file")
    sp.add_argument("-c", "--count", type=int, default=default, help="stop after this many packets")
    sp.add_argument("--duration", type=float, metavar="S", default=default, help="stop after S seconds")
    sp.add_argument("-p", "--no-promiscuous-mode", dest="promiscuous", action="store_false",
                    default=argparse.SUPPRESS if suppress else True,
                    help="as tcpdump -p: do not put the interface in promiscuous mode (on a bridge "
                         "such as docker0, promiscuous mode changes what br_netfilter delivers)")
    sp.add_argument("--decode", action="store_true", default=argparse.SUPPRESS if suppress else False,
                    help="show encapsulated packets as outer + inner headers (flannel udp, vxlan)")
    sp.add_argument("-n", "--namespace", default=argparse.SUPPRESS if suppress else "default")
    if suppress:
        sp.add_argument("--cluster", default=argparse.SUPPRESS)


def split_filter(args) -> None:
    """Options written after the filter's first word (`capture n1 udp --duration 3`)
    land in args.filter: move them into ARGS, leaving the filter words (all words
    after a `--` are filter words)."""
    words = list(args.filter)
    tail = []
    if "--" in words:
        i = words.index("--")
        words, tail = words[:i], words[i + 1:]
    tail_parser = argparse.ArgumentParser(prog="netemu capture", add_help=False)
    _capture_options(tail_parser, suppress=True)
    parsed, rest = tail_parser.parse_known_args(words)
    unknown = [w for w in rest if w.startswith("-") and len(w) > 1]
    if unknown:
        raise CaptureCliError(f"unknown option {unknown[0]} (a filter word cannot start with '-')")
    for key, value in vars(parsed).items():
        setattr(args, key, value)
    args.filter = rest + tail


def _view(args):
    from netemu.capture import targets
    cluster = clusters.resolve(args.cluster)
    return cluster, targets.load_view(cluster)


def _register_cluster_ports(view) -> None:
    from netemu.capture import decode
    if view.backend == "udp" and view.backend_port:
        decode.register_ports(udp_ports=[view.backend_port])
    elif view.backend == "vxlan" and view.backend_port:
        decode.register_ports(vxlan_ports=[view.backend_port])


def cmd_capture(args) -> int:
    from netemu.capture import targets, tcpdump

    split_filter(args)
    cluster, view = _view(args)
    target = targets.resolve_target(view, args.target, args.namespace)
    if target.outer_iface is not None:
        os.environ[names.CLUSTER_ENV] = cluster
        return _capture_machine(view, target, args)
    iface = args.interface or target.iface
    bpf = args.filter or None
    # tcpdump inherits our environment: the tag lets `netemu clean` find it.
    os.environ[names.CLUSTER_ENV] = cluster
    if args.count is not None and args.count <= 0:
        raise CaptureCliError("-c must be a positive number of packets")
    print(f"capturing in {target.netns} on {iface} ({target.label})"
          + (f" into {args.write}" if args.write else ""), file=sys.stderr, flush=True)
    if args.decode and not args.write:
        try:
            return _capture_decoded(view, target.netns, iface, bpf, args)
        except tcpdump.CaptureError as e:
            raise CaptureCliError(str(e)) from None
    rc = tcpdump.run_live(target.netns, iface, bpf, pcap_path=args.write, count=args.count,
                          duration=args.duration, promiscuous=args.promiscuous)
    if args.write and args.decode:
        _print_decoded(view, args.write)
    # tcpdump exits 0 on SIGINT after a clean flush; anything else is its error.
    return 0 if rc in (0, -2, 130) else 1


def layer_paths(path: str) -> tuple[str, str]:
    """The pcap files of a machine tunnel's two layers, for `-w PATH`:
    x.pcap -> x-inner.pcap, x-outer.pcap."""
    stem, ext = os.path.splitext(path)
    if ext not in (".pcap", ".pcapng"):
        stem, ext = path, ".pcap"
    return f"{stem}-inner{ext}", f"{stem}-outer{ext}"


def machine_layers(view, target, bpf, pcap_path: str | None = None, promiscuous: bool = True) -> list:
    """The two tcpdumps of `capture machine/NAME`: the inner layer on the fabric's
    port (the user's filter applies there) and the outer on this machine's link,
    in its own namespace, never promiscuous (the datagrams are addressed to this
    machine, and the machine's interface flags are not ours to change), with the
    filter that keeps only this tunnel's datagrams."""
    from netemu.capture import tcpdump

    inner_path, outer_path = layer_paths(pcap_path) if pcap_path else (None, None)
    return [tcpdump.Layer(f"inner {target.iface}", target.netns, target.iface, bpf, inner_path, promiscuous),
            tcpdump.Layer(f"outer {target.outer_iface}", None, target.outer_iface, target.outer_filter,
                          outer_path, promiscuous=False)]


def _capture_machine(view, target, args) -> int:
    from netemu.capture import targets, tcpdump

    if args.interface:
        raise CaptureCliError(f"{target.label} captures on {target.iface} and {target.outer_iface}: "
                              "-i does not apply")
    if args.decode and not args.write:
        raise CaptureCliError(f"--decode of {target.label} needs -w FILE.pcap (the layers are decoded "
                              "from their files afterwards)")
    if args.count is not None and args.count <= 0:
        raise CaptureCliError("-c must be a positive number of packets")
    peer = view.machines[target.label.split("/", 1)[1]]
    layers = machine_layers(view, target, args.filter or None, args.write, args.promiscuous)
    print(f"capturing the tunnel to machine {peer.name} (VXLAN {peer.vni}, UDP {targets.MACHINE_PORT}, "
          f"{view.here_address} <-> {peer.address}) at both layers:", file=sys.stderr)
    for layer, what in zip(layers, ("the fabric's frames", "their VXLAN datagrams")):
        where = layer.ns or "this machine's own namespace"
        into = f" into {layer.pcap_path}" if layer.pcap_path else ""
        filt = f" ({layer.bpf_filter if isinstance(layer.bpf_filter, str) else ' '.join(layer.bpf_filter)})" \
            if layer.bpf_filter else ""
        print(f"  {layer.label}: {what}, in {where} on {layer.iface}{filt}{into}", file=sys.stderr)
    sys.stderr.flush()
    codes = tcpdump.run_layers(layers, count=args.count, duration=args.duration)
    if args.write and args.decode:
        _register_machine_ports(view)
        for layer in layers:
            print(f"--- {layer.label}: {layer.pcap_path}")
            _print_decoded(view, layer.pcap_path)
    return 0 if all(rc in (0, -2, 130) for rc in codes) else 1


def _register_machine_ports(view) -> None:
    from netemu.capture import decode, targets
    if view.machines:
        decode.register_ports(machine_ports=[targets.MACHINE_PORT])


def _capture_decoded(view, ns: str, iface: str, bpf, args) -> int:
    from netemu.capture import decode, tcpdump

    _register_cluster_ports(view)
    table = decode.FlowTable()
    packets = tcpdump.live_decoded(ns, iface, bpf, count=args.count, duration=args.duration,
                                   promiscuous=args.promiscuous)
    try:
        for d in packets:
            table.add(d)
            print(decode.format_decoded(d, with_time=True), flush=True)
    except KeyboardInterrupt:
        pass   # Ctrl-C: closing the generator below stops tcpdump
    finally:
        packets.close()
    print("\n" + decode.format_flows(table.flows(), table.others))
    return 0


def _print_decoded(view, path: str) -> None:
    from netemu.capture import decode
    _register_cluster_ports(view)
    table = decode.FlowTable()
    for d in decode.decode_pcap(path):
        table.add(d)
        print(decode.format_decoded(d, with_time=True))
    print("\n" + decode.format_flows(table.flows(), table.others))


def cmd_decode(args) -> int:
    from netemu.capture import decode

    if not os.path.isfile(args.file):
        raise FileNotFoundError(f"no such file: {args.file}")
    decode.register_ports(udp_ports=args.port_udp, vxlan_ports=args.port_vxlan)
    table = decode.FlowTable()
    for d in decode.decode_pcap(args.file):
        table.add(d)
        if not args.flows_only:
            print(decode.format_decoded(d, with_time=True))
    if not args.flows_only:
        print()
    print(decode.format_flows(table.flows(), table.others))
    return 0


def cmd_trace(args) -> int:
    from netemu.capture import graph, trace

    if args.output:
        graph.picture_format(args.output)      # a name we cannot write: say so before probing
    cluster, view = _view(args)
    os.environ[names.CLUSTER_ENV] = cluster
    result = trace.run_trace(view, args.source, args.dest, port=args.port, proto=args.proto,
                             namespace=args.namespace, timeout=args.timeout, keep_pcaps=args.keep_pcaps)
    print(trace.format_trace(result))
    if args.output:
        graph.write_picture(graph.trace_drawing(result), args.output)
        print(f"\npicture written to {args.output}")
    if not result.reached:
        print("netemu: the probe did not reach its destination", file=sys.stderr)
        return 1
    return 0


def cmd_graph(args) -> int:
    from netemu.capture import graph

    if args.output:
        graph.picture_format(args.output)
    cluster, view = _view(args)
    if args.output:
        graph.write_picture(graph.cluster_drawing(view), args.output)
        print(f"picture of cluster {cluster} written to {args.output}")
    else:
        print(graph.cluster_text(view))
    return 0
