#!/usr/bin/env python3
"""How long `up` and `down` take for N nodes x M pods (a benchmark, not a test).

    sudo .venv/bin/python tools/bench_up.py [--nodes 20] [--pods-per-node 10] [--rounds 3] [--backend udp]
                                            [--name bench-up] [--idle 10] [--settle 60]

Each round builds a cluster whose pods are pinned to nodes (so the figure is the
data plane's cost: namespaces, veths, addresses, processes, readiness), waits
until every pod is Running and ready, then tears it down. Prints per round and the
median. With everything running it also measures the cluster's own processes
(control plane, node agents or daemons, udp workers; not the containers'
stand-ins): their number, and their memory as RSS, PSS (shared pages divided
among the processes that share them: the fair figure for forked processes)
and USS (pages of that process alone), from /proc/PID/smaps_rollup, per node;
and the CPU time of every process of the cluster (containers too) as a share
of one core, over two windows of --idle seconds: one 5 s after those figures
(a cluster just up is still busy: its first lease renewals, proxy syncs,
stats), one starting --settle seconds after up returned (the idle cluster).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netemu import cluster as clusters  # noqa: E402
from netemu.overlay import fastudp  # noqa: E402
from netemu.topology.loader import load_topology  # noqa: E402


ROLES = (("control plane", (b"netemu.controlplane", b"netemu.apiserver")),
         ("node daemons", (b"netemu.node.agent", b"netemu.overlay.daemon", b"netemu.proxy.daemon")))


def role_of(pid: int) -> str | None:
    """Which of the cluster's own kinds of process PID is (None: a container's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except FileNotFoundError:
        return None
    for role, modules in ROLES:
        if any(m in argv for m in modules):
            return role
    return "udp workers" if fastudp.worker_direction(argv) else None


def memory_kb(pid: int) -> dict[str, int]:
    """Rss, Pss and USS (Private_Clean + Private_Dirty) of PID, in kB."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Rss":
                    out["rss"] = int(rest.split()[0])
                elif key == "Pss":
                    out["pss"] = int(rest.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["uss"] += int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def cpu_ticks(pids, children: bool = False) -> int:
    """utime + stime of PIDS (CHILDREN: of the children they have reaped,
    cutime + cstime: the short-lived commands they ran)."""
    total = 0
    first = 13 if children else 11
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[first]) + int(fields[first + 1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


def machine_busy_ticks() -> int:
    """CPU ticks the whole machine spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]          # all but idle and iowait


def up_cpu(name: str) -> dict[str, float]:
    """CPU seconds the cluster's processes have used since they started (at the
    end of up: its cost), by role, their own and their reaped children's."""
    hz = os.sysconf("SC_CLK_TCK")
    roles: dict[str, list[int]] = {}
    for pid in clusters.cluster_processes(name):
        roles.setdefault(role_of(pid) or "containers", []).append(pid)
    out = {}
    for role, pids in roles.items():
        out[role] = cpu_ticks(pids) / hz
        out[role + " (children)"] = cpu_ticks(pids, children=True) / hz
    return out


def idle_cpu(name: str, seconds: float) -> tuple[float, dict[str, float]]:
    """The CPU time every process of the cluster (containers too) spends over
    SECONDS, as a share of one core: in all, and by role."""
    roles: dict[str, list[int]] = {}
    for pid in clusters.cluster_processes(name):
        roles.setdefault(role_of(pid) or "containers", []).append(pid)
    hz = os.sysconf("SC_CLK_TCK")
    t0, c0 = time.monotonic(), {role: cpu_ticks(pids) for role, pids in roles.items()}
    time.sleep(seconds)
    t1, c1 = time.monotonic(), {role: cpu_ticks(pids) for role, pids in roles.items()}
    shares = {role: 100.0 * (c1[role] - c0[role]) / hz / (t1 - t0) for role in roles}
    return sum(shares.values()), shares


def measure(name: str, nodes: int, idle: float, settle: float, ready_at: float) -> dict:
    procs = clusters.cluster_processes(name)
    by_role: dict[str, list[int]] = {}
    for pid in procs:
        by_role.setdefault(role_of(pid) or "containers", []).append(pid)
    report = {"processes": len(procs), "roles": {}}
    own = {"count": 0, "rss": 0, "pss": 0, "uss": 0}
    for role, pids in sorted(by_role.items()):
        mem = {"count": len(pids), "rss": 0, "pss": 0, "uss": 0}
        for pid in pids:
            for k, v in memory_kb(pid).items():
                mem[k] += v
        report["roles"][role] = mem
        if role != "containers":
            for k in own:
                own[k] += mem[k]
    report["own"] = own
    report["own_per_node_mb"] = {k: own[k] / 1024 / nodes for k in ("rss", "pss", "uss")}
    report["own_processes_per_node"] = own["count"] / nodes
    if idle > 0:
        time.sleep(5)                   # let the last status writes settle
        report["idle_cpu_percent"], roles = idle_cpu(name, idle)
        for role, share in roles.items():
            report["roles"].setdefault(role, {})["idle_cpu_percent"] = share
        time.sleep(max(0.0, settle - (time.monotonic() - ready_at)))
        report["settled_cpu_percent"], roles = idle_cpu(name, idle)
        for role, share in roles.items():
            report["roles"].setdefault(role, {})["settled_cpu_percent"] = share
    return report


def write_topology(path: str, name: str, nodes: int, pods_per_node: int, backend: str) -> str:
    """The benchmark's cluster: NODES nodes n0..., PODS_PER_NODE pods p<node>-<j>
    pinned to each (labelled app=web-n<node>), in a topology file at PATH."""
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"p{i}-{j}", "labels": {"app": f"web-n{i}"}},
             "spec": {"nodeName": f"n{i}", "containers": [
                 {"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]}}
            for i in range(nodes) for j in range(pods_per_node)]
    with open(path, "w") as f:
        yaml.safe_dump({"name": name, "cluster": {"backend": backend},
                        "nodes": [{"name": f"n{i}"} for i in range(nodes)], "workloads": pods}, f)
    return path


def take_lock(wait: bool):
    """One benchmark at a time on this machine (the lock `netemu bench` takes too)."""
    lock = open("/run/netemu-bench.lock", "w")
    if wait:
        fcntl.flock(lock, fcntl.LOCK_EX)
    else:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit("another benchmark is running (/run/netemu-bench.lock); try --wait-lock")
    return lock


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--pods-per-node", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="udp")
    ap.add_argument("--wait-lock", action="store_true", help="wait for another benchmark to finish")
    ap.add_argument("--name", default="bench-up", help="the cluster's name")
    ap.add_argument("--idle", type=float, default=10.0,
                    help="seconds over which to measure idle CPU (0: do not)")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="the second idle window starts this many seconds after up returned (a cluster "
                         "just up is still busy for a while: its first lease renewals, proxy syncs, stats)")
    ap.add_argument("--timeout", type=float, default=None, help="up's readiness timeout (s)")
    args = ap.parse_args()
    lock = take_lock(args.wait_lock)  # noqa: F841 - held until exit
    name = args.name
    with tempfile.TemporaryDirectory() as tmp:
        path = write_topology(os.path.join(tmp, "bench.yaml"), name, args.nodes, args.pods_per_node,
                              args.backend)
        ups, downs = [], []
        for r in range(args.rounds):
            topo = load_topology(path)
            t0, busy0 = time.monotonic(), machine_busy_ticks()
            try:
                if args.timeout:
                    clusters.READY_TIMEOUT = args.timeout
                clusters.up(topo, kubeconfig=False)
                t1, busy1 = time.monotonic(), machine_busy_ticks()
                spent = up_cpu(name)
                m = measure(name, args.nodes, args.idle, args.settle, t1)
            finally:
                t2 = time.monotonic()
                clusters.teardown(name, graceful=True)
                t3 = time.monotonic()
            ups.append(t1 - t0)
            downs.append(t3 - t2)
            own = m["own_per_node_mb"]
            print(f"round {r + 1}: up {t1 - t0:.1f} s, down {t3 - t2:.1f} s, {m['processes']} processes; "
                  f"own processes per node {m['own_processes_per_node']:.2f}, "
                  f"memory per node RSS {own['rss']:.1f} MB, PSS {own['pss']:.1f} MB, USS {own['uss']:.1f} MB"
                  + (f"; idle CPU {m['idle_cpu_percent']:.1f}% of one core just after up, "
                     f"{m['settled_cpu_percent']:.1f}% from {args.settle:.0f} s after up" if args.idle > 0 else ""),
                  flush=True)
            print(f"    CPU during up: machine {(busy1 - busy0) / os.sysconf('SC_CLK_TCK'):.1f} s; "
                  + ", ".join(f"{role} {sec:.1f} s" for role, sec in sorted(spent.items())), flush=True)
            for role, mem in m["roles"].items():
                print(f"    {role}: {mem.get('count', 0)} processes, RSS {mem.get('rss', 0) / 1024:.0f} MB, "
                      f"PSS {mem.get('pss', 0) / 1024:.0f} MB, USS {mem.get('uss', 0) / 1024:.0f} MB"
                      + (f", idle CPU {mem.get('idle_cpu_percent', 0.0):.1f}% then "
                         f"{mem.get('settled_cpu_percent', 0.0):.1f}%" if args.idle > 0 else ""), flush=True)
    print(f"{args.nodes} nodes x {args.pods_per_node} pods ({args.backend}): "
          f"up median {statistics.median(ups):.1f} s (min {min(ups):.1f}, max {max(ups):.1f}); "
          f"down median {statistics.median(downs):.1f} s (min {min(downs):.1f}, max {max(downs):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
