"""`netemu bench`: measure encapsulation with real tools on real two-node clusters.

One cluster per backend is built at the start and kept for all rounds (building
takes seconds and its noise has nothing to do with the data path; rebuilding per
round would only add machine load between measurements). Each cluster has three
pods: bench-client and bench-local on node1, bench-server on node2. Rounds are
interleaved (udp, vxlan, host-gw, udp, vxlan, host-gw ...) so that each backend
meets the same machine weather as host-gw in its round; report.py turns that
into ratios.

Tools run inside the pods' network namespaces: iperf3 (TCP, 1 and 4 streams;
64-byte UDP from three senders at once for the packet rate), and
netemu.bench.pingpong for request/response latency. Around each run we read
the overlay daemons' CPU time (/proc/<pid>/stat, the daemon and its worker
processes), the whole machine's busy CPU time (/proc/stat; report.cpu_cost
makes both into cores per Gbit/s or per 100 kpps), their drop counters,
flannel0's TX drops and UdpRcvbufErrors from each node namespace's
/proc/net/snmp. Every round trip of the latency test goes into a histogram per
backend (bench.json's latency_histograms, and the PNG).

Only one benchmark runs on a machine at a time: an exclusive flock on
/run/netemu-bench.lock, held for the whole run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import time
from typing import Callable, Iterator

from netemu import cluster as clusters, names, netns
from netemu.bench import report
from netemu.bench.report import Sample

LOCK_PATH = "/run/netemu-bench.lock"
NODES = ("node1", "node2")
CLIENT, SERVER, LOCAL = "bench-client", "bench-server", "bench-local"
TCP_PORT, PINGPONG_PORT = 5201, 7000
UDP_SENDERS = (5202, 5203, 5204)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark cannot run (another holds the lock, a tool failed)."""


@dataclasses.dataclass
class Options:
    backends: list[str]
    tests: list[str]
    rounds: int = 3
    duration: float = 5.0
    mtu: int = 1500
    output: str = "bench-results"
    prefix: str = "hb-b"          # cluster names: <prefix>-<backend>
    lock_wait: float = 0.0        # seconds to wait for another benchmark to finish (0: refuse)
    # Every node uplink's impairment (`--link "rate 100mbit loss 0.1%"`), as a
    # topology file's cluster.link: the backends over a WAN-like underlay.
    link: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def exclusive(path: str = LOCK_PATH, wait: float = 0.0) -> Iterator[None]:
    """Hold the machine's benchmark lock (any benchmark of the project takes it)."""
    deadline = time.monotonic() + wait
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BenchError(f"another benchmark is running (it holds {path})") from None
                time.sleep(0.5)
        yield


def topology(name: str, backend: str, mtu: int, link: dict | None = None) -> dict:
    def pod(pod_name: str, node: str) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}
    return {"name": name, "cluster": {"backend": backend, "underlayMTU": mtu, **({"link": link} if link else {})},
            "nodes": [{"name": n} for n in NODES],
            "workloads": [pod(CLIENT, "node1"), pod(SERVER, "node2"), pod(LOCAL, "node1")]}


class BenchCluster:
    """One running two-node cluster and the servers in its pods."""

    def __init__(self, name: str, backend: str, mtu: int, link: dict | None = None):
        self.name, self.backend, self.mtu, self.link = name, backend, mtu, link
        self.servers: list[subprocess.Popen] = []
        self.ips: dict[str, str] = {}
        self.cluster = None             # a netemu.Cluster once built

    def up(self) -> None:
        import netemu

        if os.path.exists(names.state_dir(self.name)):
            clusters.teardown(self.name, graceful=False)     # a crashed bench's leftover
        # The Python API's up: built from a dict (no YAML file), ready when it
        # returns; a throw-away cluster, so no kubeconfig context.
        self.cluster = netemu.up(topology(self.name, self.backend, self.mtu, self.link), kubeconfig=False,
                                 progress=lambda line: None)
        for pod in (CLIENT, SERVER, LOCAL):
            ip = self.cluster.pods[pod].ip
            if not ip:
                raise BenchError(f"{self.name}: pod {pod} has no IP")
            self.ips[pod] = ip
        for pod in (SERVER, LOCAL):
            ns = self.ns(pod)
            for port in (TCP_PORT, *UDP_SENDERS):
                self._serve(ns, ["iperf3", "-s", "-p", str(port)])
            self._serve(ns, [sys.executable, "-m", "netemu.bench.pingpong", "serve", str(PINGPONG_PORT)])
        time.sleep(0.5)

    def _serve(self, ns: str, argv: list[str]) -> None:
        self.servers.append(subprocess.Popen(netns.exec_argv(ns, argv), stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))

    def down(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()
        self.servers = []
        if self.cluster is not None:
            self.cluster.down()
            self.cluster = None
        else:
            clusters.teardown(self.name, graceful=False)     # an up that failed has rolled back; idempotent

    def ns(self, pod: str) -> str:
        return names.pod_ns(self.name, "default", pod)

    # -- the side figures ------------------------------------------------------

    def daemon_stats(self) -> dict[str, dict]:
        """The overlay daemons' records in the store (netemu.overlay.stats)."""
        from netemu.overlay import stats

        store = clusters.open_store(self.name)
        try:
            return {node: stats.read(store, node) or {} for node in NODES}
        finally:
            store.close()

    def snapshot(self) -> dict[str, float]:
        """Cumulative figures whose differences around a run we report."""
        snap: dict[str, float] = {}
        for node, stats in self.daemon_stats().items():
            pid = stats.get("pid")
            if pid:
                for role, p in [("daemon", pid)] + [(worker_role(c), c) for c in children(pid)]:
                    snap[f"cpu_{node}_{role}_s"] = cpu_seconds(p)
            for key, value in stats.get("counters", {}).items():
                if key.startswith("drop") or key.endswith("errors"):
                    snap[f"{key}_{node}"] = value
            node_ns = names.node_ns(self.name, node)
            snap[f"drop_udp_rcvbuf_{node}"] = udp_rcvbuf_errors(node_ns)
            if self.backend == "udp":
                snap[f"drop_tun_tx_{node}"] = tun_tx_dropped(node_ns)
        return snap


def worker_role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return f"child{pid}"
    from netemu.overlay.fastudp import worker_direction

    return worker_direction(argv) or f"child{pid}"


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """utime + stime of PID (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def udp_rcvbuf_errors(ns: str) -> int:
    # /proc/net is the reader's namespace: read it from a process inside NS.
    text = netns.run(ns, ["cat", "/proc/net/snmp"]).stdout
    udp = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
    if len(udp) < 2:
        return 0
    return int(dict(zip(udp[0], udp[1])).get("RcvbufErrors", 0))


def tun_tx_dropped(ns: str) -> int:
    proc = netns.run(ns, ["ip", "-s", "-j", "link", "show", "flannel0"], check=False)
    try:
        return int(json.loads(proc.stdout)[0]["stats64"]["tx"]["dropped"])
    except (ValueError, LookupError):
        return 0


def machine_busy_seconds() -> float:
    """The machine's busy CPU time so far, all CPUs (report.cpu_busy), in seconds."""
    with open("/proc/stat") as f:
        return report.cpu_busy(f.read()) / CLK_TCK


def differences(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    out = {k: after[k] - before.get(k, 0) for k in after}
    out["cpu_daemon_s"] = sum(v for k, v in out.items() if k.startswith("cpu_"))
    return {k: round(v, 3) for k, v in out.items()}


# -- the tests ----------------------------------------------------------------

def iperf(bc: BenchCluster, target: str, extra: list[str], duration: float, port: int = TCP_PORT) -> dict:
    argv = ["iperf3", "-c", bc.ips[target], "-p", str(port), "-t", str(duration), "-J", *extra]
    proc = netns.run(bc.ns(CLIENT), argv, check=False, timeout=duration + 30)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        raise BenchError(f"iperf3 gave no JSON: {proc.stderr.strip()}") from None
    if "error" in result:
        raise BenchError(f"iperf3 ({bc.backend} → {target}): {result['error']}")
    return result


def run_test(bc: BenchCluster, test: str, target: str, duration: float) -> list[tuple[str, float, dict]]:
    """Run TEST from the client pod to TARGET: [(figure, value, extra)]."""
    if test in ("tcp", "tcp-parallel"):
        gbps, retransmits = report.iperf_tcp(iperf(bc, target, ["-P", "4"] if test == "tcp-parallel" else [],
                                                   duration))
        return [(test, gbps, {"retransmits": retransmits})]
    if test == "udp-rate":
        argv = [["iperf3", "-c", bc.ips[target], "-p", str(port), "-u", "-b", "0", "-l", "64",
                 "-t", str(duration), "-J"] for port in UDP_SENDERS]
        procs = [subprocess.Popen(netns.exec_argv(bc.ns(CLIENT), a), stdout=subprocess.PIPE, text=True)
                 for a in argv]
        received, seconds = 0, duration
        for proc in procs:
            out, _ = proc.communicate(timeout=duration + 30)
            try:
                n, seconds = report.iperf_udp_received(json.loads(out))
            except (ValueError, KeyError):
                raise BenchError(f"iperf3 -u gave no usable JSON: {out[-300:]!r}") from None
            received += n
        return [(test, received / seconds / 1000, {})]
    if test == "latency":
        proc = netns.run(bc.ns(CLIENT), [sys.executable, "-m", "netemu.bench.pingpong", "client",
                                         bc.ips[target], str(PINGPONG_PORT), str(duration)],
                         timeout=duration + 30)
        rtts = json.loads(proc.stdout)["rtt_us"]
        if not rtts:
            raise BenchError("latency: no round trip completed")
        return [("latency-p50", report.percentile(rtts, 50), {"count": len(rtts),
                                                              "histogram": report.histogram(rtts)}),
                ("latency-p99", report.percentile(rtts, 99), {"count": len(rtts)})]
    raise ValueError(f"unknown test {test}")


def plan(opts: Options) -> list[tuple[int, str, str, str]]:
    """(round, backend, test, target) in the order they run: interleaved by backend
    within each round; same-node TCP as the reference path."""
    steps = []
    for rnd in range(opts.rounds):
        for backend in opts.backends:
            for test in opts.tests:
                steps.append((rnd, backend, test, SERVER))
            if "tcp" in opts.tests:
                steps.append((rnd, backend, "tcp", LOCAL))
    return steps


def run(opts: Options, on_step: Callable[[str], None] = lambda s: None,
        on_setup: Callable[[str], None] = lambda s: None) -> dict:
    """Run the benchmark; returns the results dict also written to OPTS.output."""
    clusters.require_root()
    os.makedirs(opts.output, exist_ok=True)
    samples: list[Sample] = []
    failures: list[dict] = []
    histograms: dict[str, list[int]] = {}          # backend -> round trips per bin, all rounds
    with exclusive(wait=opts.lock_wait):
        built: dict[str, BenchCluster] = {}
        try:
            for backend in opts.backends:
                on_setup(f"building the {backend} cluster")
                bc = BenchCluster(f"{opts.prefix}-{backend.replace('-', '')}", backend, opts.mtu, opts.link)
                built[backend] = bc
                bc.up()
            for rnd, backend, test, target in plan(opts):
                bc = built[backend]
                path = "same-node" if target == LOCAL else "cross-node"
                on_step(f"round {rnd + 1}: {backend} {test} {path}")
                before = bc.snapshot()
                busy, start = machine_busy_seconds(), time.monotonic()
                try:
                    figures = run_test(bc, test, target, opts.duration)
                    seconds, busy = time.monotonic() - start, machine_busy_seconds() - busy
                except (BenchError, subprocess.TimeoutExpired, netns.NetnsError) as e:
                    # One failed run (e.g. iperf3's control connection starved by
                    # a UDP flood through a slow overlay) is reported, not fatal.
                    failures.append({"round": rnd, "backend": backend, "test": test, "path": path,
                                     "error": str(e)[:500]})
                    continue
                if backend == "udp":
                    time.sleep(1.2)          # the daemon publishes its counters once a second
                side = differences(before, bc.snapshot())
                for figure, value, extra in figures:
                    counts = extra.pop("histogram", None)
                    if counts is not None and path == "cross-node":
                        total = histograms.setdefault(backend, [0] * len(counts))
                        histograms[backend] = [a + b for a, b in zip(total, counts)]
                    cost = report.cpu_cost(figure, value, seconds, busy, side.get("cpu_daemon_s", 0.0))
                    samples.append(Sample(rnd, backend, figure, path, value, {**side, **extra, **cost}))
        finally:
            for bc in built.values():
                bc.down()
    return write_results(opts, samples, failures, histograms)


def write_results(opts: Options, samples: list[Sample], failures: list[dict] = (),
                  histograms: dict[str, list[int]] | None = None) -> dict:
    rows = report.summarize(samples)
    config = {"backends": opts.backends, "tests": opts.tests, "rounds": opts.rounds,
              "duration": opts.duration, "mtu": opts.mtu, "kernel": os.uname().release,
              "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **({"link": opts.link} if opts.link else {})}
    results = {"config": config, "summary": rows, "samples": [dataclasses.asdict(s) for s in samples],
               "failures": list(failures),
               "latency_histograms": {"edges_us": report.HISTOGRAM_EDGES, "counts": dict(histograms or {})}}
    with open(os.path.join(opts.output, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(opts.output, "bench.md"), "w") as f:
        f.write(report.markdown(rows, config))
        for failure in failures:
            f.write(f"\nFailed: round {failure['round'] + 1} {failure['backend']} {failure['test']} "
                    f"{failure['path']}: {failure['error'][:200]}\n")
    from netemu.bench import plot
    plot.draw(rows, config, os.path.join(opts.output, "bench.png"), results["latency_histograms"])
    return results
