"""The `netemu bench` verb: a thin layer over netemu.bench.runner.

netemu.cli's build_parser calls `register(sub, verb, with_cluster)`.

    netemu bench [--backends udp,vxlan,host-gw] [--tests tcp,tcp-parallel,udp-rate,latency]
                 [--rounds N] [--duration S] [--mtu M] [--wait S] [--name-prefix P] [-o DIR]
"""

from __future__ import annotations

import os

from netemu.bench import report


def register(sub, verb, with_cluster) -> None:
    sp = verb("bench", cmd_bench, "measure pod-to-pod throughput, packet rate and latency of each "
                                  "overlay backend on throw-away two-node clusters (ratios to host-gw)")
    sp.add_argument("--backends", default=",".join(report.BACKENDS), help="comma-separated backends")
    sp.add_argument("--tests", default=",".join(report.TESTS), help="comma-separated tests")
    sp.add_argument("--rounds", type=int, default=3)
    sp.add_argument("--duration", type=float, default=5.0, metavar="S", help="seconds per test")
    sp.add_argument("--mtu", type=int, default=1500, help="underlay MTU (1500; 9000 for jumbo frames)")
    sp.add_argument("--wait", type=float, default=0, metavar="S",
                    help="wait up to S seconds for another benchmark to finish (default: refuse at once)")
    sp.add_argument("--link", default="", metavar="PROPS",
                    help='impair every node uplink: "rate 100mbit loss 0.1%%" (as netemu link set)')
    sp.add_argument("--name-prefix", default="hb-b", metavar="P",
                    help="the throw-away clusters are named P-<backend> (default hb-b), so a run beside "
                         "other clusters of the machine can keep clear of their names")
    sp.add_argument("-o", "--output", default="bench-results", metavar="DIR",
                    help="folder for bench.json, bench.md and bench.png")


def parse_link(text: str) -> dict:
    """--link "rate 100mbit loss 0.1%" -> {"rate": "100mbit", "loss": "0.1%"},
    checked as `link set` checks it (a property this kernel lacks is refused
    here, before any cluster is built)."""
    from netemu import impairment

    words = text.split()
    if len(words) % 2:
        raise ValueError(f"--link {text!r}: expected PROPERTY VALUE pairs, e.g. \"rate 100mbit loss 0.1%\"")
    props = dict(zip(words[::2], words[1::2]))
    try:
        impairment.parse(props)
    except impairment.ImpairmentError as e:
        raise ValueError(f"--link: {e}") from None
    return props


def check_prefix(prefix: str) -> str:
    """--name-prefix: every cluster name it makes (P-udp ... P-hostgw) must be one
    `netemu up --name` takes, so a bad prefix fails here, before any cluster."""
    from netemu import names
    from netemu.topology import names as rules
    from netemu.topology.loader import CLUSTER_NAME_MAX

    for backend in report.BACKENDS:
        name = f"{prefix}-{backend.replace('-', '')}"
        if len(name) > CLUSTER_NAME_MAX or rules.dns1123_label(name):
            raise ValueError(f'--name-prefix "{prefix}": the cluster name "{name}" it makes is not a lowercase '
                             f"DNS label of at most {CLUSTER_NAME_MAX} characters")
        problem = names.cluster_name_problem(name)
        if problem:
            raise ValueError(f'--name-prefix "{prefix}": the cluster name "{name}": {problem}')
    return prefix


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from netemu.bench import runner

    backends = report.parse_list(args.backends, report.BACKENDS, "backend")
    if "host-gw" not in backends:
        backends.append("host-gw")           # every ratio needs it, in the same round
    opts = runner.Options(backends=backends, tests=report.parse_list(args.tests, report.TESTS, "test"),
                          rounds=args.rounds, duration=args.duration, mtu=args.mtu, output=args.output,
                          lock_wait=args.wait, link=parse_link(args.link),
                          prefix=check_prefix(args.name_prefix))
    if opts.rounds < 1 or opts.duration <= 0:
        raise ValueError("--rounds must be ≥ 1 and --duration > 0")
    console = Console(stderr=True)
    steps = runner.plan(opts)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("setting up", total=len(steps))

        def on_step(text: str, first=[True]) -> None:
            if not first[0]:
                progress.advance(task)
            first[0] = False
            progress.update(task, description=text)

        try:
            results = runner.run(opts, on_step=on_step,
                                 on_setup=lambda t: progress.update(task, description=t))
        except runner.BenchError as e:
            raise ValueError(str(e)) from None
        progress.update(task, completed=len(steps), description="done")
    table = Table(title=f"netemu bench — underlay MTU {opts.mtu}, {opts.rounds} rounds of {opts.duration:g} s")
    for header in report.HEADERS:
        table.add_column(header)
    for row in results["summary"]:
        table.add_row(*report.cells(row))
    Console().print(table)
    for failure in results["failures"]:
        print(f"failed: round {failure['round'] + 1} {failure['backend']} {failure['test']} {failure['path']}: "
              f"{failure['error'][:200]}")
    print(f"results: {os.path.join(opts.output, 'bench.json')}, bench.md, bench.png")
    return 0
