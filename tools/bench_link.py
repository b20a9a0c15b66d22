#!/usr/bin/env python3
"""How exact an impaired link is (a benchmark, not a test).

    sudo .venv/bin/python tools/bench_link.py [--name linkbench] [--packets 100000]
        [--loss 1%,0.1%] [--rates 10mbit,100mbit,500mbit] [--delays 1ms,10ms,100ms]
        [--duration 4] [--repeats 3]

On a throw-away two-node cluster (nodes a and b, no pods), node a's uplink is
impaired with `netemu link set` and traffic goes from node a to node b:

- loss: PACKETS UDP datagrams of 64 bytes, paced; those node b's socket gets are
  counted (its buffer is forced large, and its namespace's UdpRcvbufErrors must
  stay 0, so that every missing datagram was dropped by the link). Passes when
  the count is inside the binomial 99% interval around PACKETS x (1 - loss).
- rate: iperf3 TCP from a to b for DURATION seconds, measured at the receiver
  (what the sender's socket buffer takes at first is not what the link
  carried; iperf3's -O would drop that second from the sender's figures only,
  not from the receiver's, and the receiver's figures would be off). tc's rate counts whole frames, so the goodput expected at rate R
  is R x MSS / (MSS + 66): 66 = Ethernet 14 + IPv4 20 + TCP with timestamps 32.
  Run REPEATS times; passes when the median error is within 5% (min and max
  are reported).
- delay: ping from a to b (both directions delayed, so RTT = base + 2 x delay,
  the base measured first with nothing set), and TCP's RTT as the time a
  connect() takes (SYN to SYN-ACK: one RTT, no delayed ACK in it; its base,
  with Python's own cost in it, also measured first). Passes when
  the mean one-way delay derived from each is within 5% or 0.2 ms of the setting.
- ceiling: TCP throughput through the delay line with a delay of 1 us, against
  the same link with nothing set, alternated REPEATS times: medians, min-max,
  and the ratio of each pair.

The cluster comes from the Python API (netemu.up, a dict: no YAML file, no
kubeconfig context) and is torn down however the run ends.

Takes the machine's benchmark lock (/run/netemu-bench.lock), as `netemu bench`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import netemu  # noqa: E402
from netemu import cluster as clusters, names, netns  # noqa: E402
from netemu.bench.runner import exclusive  # noqa: E402
from netemu.impairment import parse_percent, parse_rate  # noqa: E402

NETEMU = [sys.executable, "-m", "netemu.cli"]
PORT = 9000
Z99 = 2.5758        # two-sided 99% of the normal approximation to the binomial

RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)    # SO_RCVBUFFORCE: root may exceed rmem_max
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(5.0)
n = 0
try:
    s.recv(2048); n = 1
    s.settimeout(1.0)
    while True:
        s.recv(2048); n += 1
except socket.timeout:
    pass
print(n, flush=True)
"""

SENDER = r"""
import socket, sys, time
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(64)
# About 40,000 datagrams a second: far below what the receiver drains.
for i in range(0, count, 100):
    for _ in range(min(100, count - i)):
        s.sendto(payload, (dst, port))
    time.sleep(0.0025)
"""


def cli(*args):
    proc = subprocess.run(NETEMU + list(args), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"netemu {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def rcvbuf_errors(ns: str) -> int:
    lines = [l.split() for l in netns.run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines() if l.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def node_address(cluster: str, node: str) -> str:
    out = netns.run(names.node_ns(cluster, node), ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    return out.split()[3].split("/")[0]


def measure_loss(cluster: str, loss: str, packets: int) -> dict:
    p = parse_percent(loss, "loss") / 1e6
    a, b = names.node_ns(cluster, "a"), names.node_ns(cluster, "b")
    cli("link", "set", "a", "--clear", "--cluster", cluster)
    cli("link", "set", "a", "--loss", loss, "--cluster", cluster)
    errors_before = rcvbuf_errors(b)
    receiver = subprocess.Popen(netns.exec_argv(b, [sys.executable, "-c", RECEIVER, str(PORT)]),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(netns.exec_argv(a, [sys.executable, "-c", SENDER, node_address(cluster, "b"), str(PORT),
                                           str(packets)]), check=True, timeout=600)
        got = int(receiver.communicate(timeout=60)[0].strip())
    finally:
        receiver.kill()
    mean = packets * (1 - p)
    half = Z99 * math.sqrt(packets * p * (1 - p))
    return {"loss": loss, "sent": packets, "received": got, "measured_loss_percent": 100 * (1 - got / packets),
            "interval_99": [math.floor(mean - half), math.ceil(mean + half)],
            "receiver_buffer_drops": rcvbuf_errors(b) - errors_before,
            "pass": mean - half <= got <= mean + half and rcvbuf_errors(b) == errors_before}


def measure_rate(cluster: str, rate: str, duration: float) -> dict:
    bits = parse_rate(rate)
    a, b = names.node_ns(cluster, "a"), names.node_ns(cluster, "b")
    cli("link", "set", "a", "--clear", "--cluster", cluster)
    cli("link", "set", "a", "--rate", rate, "--cluster", cluster)
    server = subprocess.Popen(netns.exec_argv(b, ["iperf3", "-s", "-1", "-p", "5201"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = netns.run(a, ["iperf3", "-c", node_address(cluster, "b"), "-p", "5201", "-t", str(duration),
                            "-J"], timeout=duration + 60).stdout
    finally:
        server.kill()
    result = json.loads(out)
    goodput = result["end"]["sum_received"]["bits_per_second"]
    mss = result["start"].get("tcp_mss_default") or 1448
    expected = bits * mss / (mss + 66)
    error = (goodput - expected) / expected
    return {"rate": rate, "mss": mss, "goodput_bps": round(goodput), "expected_goodput_bps": round(expected),
            "error_percent": round(100 * error, 2), "pass": abs(error) <= 0.05}


def ping_rtts(cluster: str, count: int) -> tuple[list[float], float]:
    """The RTTs in ms of COUNT pings from a to b (the replies that came), and
    their mean from ping's summary. ping prints each reply's time to 3
    significant digits (a 200 ms RTT to the millisecond), its summary to the
    microsecond: the mean is exact, the median and percentiles are not below
    that resolution."""
    out = netns.run(names.node_ns(cluster, "a"), ["ping", "-c", str(count), "-i", "0.02",
                                                  node_address(cluster, "b")], timeout=count + 30).stdout
    return [float(m) for m in re.findall(r"time=([0-9.]+) ms", out)], float(out.rsplit("=", 1)[1].split("/")[1])


def ping_spread(cluster: str, count: int) -> dict:
    samples, mean = ping_rtts(cluster, count)
    return {**spread(samples), "mean": mean}


def spread(samples: list[float]) -> dict:
    """Mean, median and the 10th-90th percentile spread of SAMPLES."""
    xs = sorted(samples)

    def pct(q: float) -> float:
        i = q * (len(xs) - 1)
        lo = math.floor(i)
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)
    return {"n": len(xs), "mean": statistics.fmean(xs), "median": statistics.median(xs),
            "p10": pct(0.1), "p90": pct(0.9)}


def iperf(cluster: str, duration: float, extra: list[str] = ()) -> dict:
    server = subprocess.Popen(netns.exec_argv(names.node_ns(cluster, "b"), ["iperf3", "-s", "-1", "-p", "5201"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = netns.run(names.node_ns(cluster, "a"), ["iperf3", "-c", node_address(cluster, "b"), "-p", "5201",
                                                      "-t", str(duration), "-J", *extra],
                        timeout=duration + 60).stdout
    finally:
        server.kill()
    return json.loads(out)


LISTENER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""

CONNECTOR = r"""
import socket, sys, time
for _ in range(int(sys.argv[3])):
    t = time.monotonic()
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    print((time.monotonic() - t) * 1000)
    c.close()
    time.sleep(0.02)
"""


def connect_rtts(cluster: str, count: int) -> list[float]:
    """The times in ms of COUNT TCP connects from a to b."""
    listener = subprocess.Popen(netns.exec_argv(names.node_ns(cluster, "b"),
                                                [sys.executable, "-c", LISTENER, str(PORT + 1)]),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        out = netns.run(names.node_ns(cluster, "a"), [sys.executable, "-c", CONNECTOR,
                                                      node_address(cluster, "b"), str(PORT + 1), str(count)],
                        timeout=count * 15 + 30).stdout
    finally:
        listener.kill()
    return [float(x) for x in out.split()]


def measure_delay(cluster: str, delay: str, base: dict, base_tcp: dict, count: int) -> dict:
    """One-way delay from the RTTs: (RTT - RTT with nothing set) / 2, from the
    means (what passes or fails) and from the medians; the RTTs' 10th-90th
    percentile spread as measured."""
    from netemu.impairment import parse_duration
    want = parse_duration(delay, "delay") / 1000          # ms
    cli("link", "set", "a", "--clear", "--cluster", cluster)
    cli("link", "set", "a", "--delay", delay, "--cluster", cluster)
    rtt = ping_spread(cluster, count)
    tcp = spread(connect_rtts(cluster, count))
    one_way = (rtt["mean"] - base["mean"]) / 2
    tcp_one_way = (tcp["mean"] - base_tcp["mean"]) / 2
    tolerance = max(0.05 * want, 0.2)
    return {"delay_ms": want, "ping_rtt_ms": round(rtt["mean"], 3), "ping_one_way_ms": round(one_way, 3),
            "ping_one_way_median_ms": round((rtt["median"] - base["median"]) / 2, 3),
            "ping_rtt_p10_p90_ms": [round(rtt["p10"], 3), round(rtt["p90"], 3)], "pings": rtt["n"],
            "tcp_rtt_ms": round(tcp["mean"], 3), "tcp_one_way_ms": round(tcp_one_way, 3),
            "tcp_one_way_median_ms": round((tcp["median"] - base_tcp["median"]) / 2, 3),
            "tcp_rtt_p10_p90_ms": [round(tcp["p10"], 3), round(tcp["p90"], 3)],
            "pass": abs(one_way - want) <= tolerance and abs(tcp_one_way - want) <= tolerance}


def measure_ceiling(cluster: str, duration: float, repeats: int) -> dict:
    """TCP through the delay line (delay 1 us) against the same link with
    nothing set, alternated REPEATS times: medians, min-max, and the ratio."""
    plain, lined = [], []
    for _ in range(repeats):
        cli("link", "set", "a", "--clear", "--cluster", cluster)
        plain.append(iperf(cluster, duration)["end"]["sum_received"]["bits_per_second"])
        cli("link", "set", "a", "--delay", "1us", "--cluster", cluster)
        lined.append(iperf(cluster, duration)["end"]["sum_received"]["bits_per_second"])
    cli("link", "set", "a", "--clear", "--cluster", cluster)
    ratios = [x / y for x, y in zip(lined, plain)]
    return {"plain_bps": round(statistics.median(plain)), "delay_line_bps": round(statistics.median(lined)),
            "plain_min_max_bps": [round(min(plain)), round(max(plain))],
            "delay_line_min_max_bps": [round(min(lined)), round(max(lined))],
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)], "repeats": repeats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="linkbench", help="cluster name")
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--loss", default="1%,0.1%", help="comma-separated loss settings")
    ap.add_argument("--rates", default="10mbit,100mbit,500mbit", help="comma-separated rates")
    ap.add_argument("--delays", default="1ms,10ms,100ms", help="comma-separated delays")
    ap.add_argument("--pings", type=int, default=100, help="pings per delay")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per rate")
    ap.add_argument("--repeats", type=int, default=3, help="runs per rate, and of the ceiling's pair")
    ap.add_argument("-o", "--output", help="write the results here as JSON")
    args = ap.parse_args()
    clusters.require_root()
    results = {"loss": [], "rate": [], "delay": []}
    # A throw-away cluster from the Python API (no YAML file, no kubeconfig
    # context), torn down however the run ends.
    with exclusive(), netemu.up({"name": args.name, "nodes": [{"name": "a"}, {"name": "b"}]},
                                kubeconfig=False, progress=lambda line: None):
        for loss in filter(None, args.loss.split(",")):
            r = measure_loss(args.name, loss, args.packets)
            results["loss"].append(r)
            print(f"loss {loss:>8}: {r['received']}/{r['sent']} received "
                  f"({r['measured_loss_percent']:.4f}% lost), 99% interval {r['interval_99']}, "
                  f"receiver drops {r['receiver_buffer_drops']}: {'PASS' if r['pass'] else 'FAIL'}", flush=True)
        for rate in filter(None, args.rates.split(",")):
            runs = [measure_rate(args.name, rate, args.duration) for _ in range(args.repeats)]
            errors = [x["error_percent"] for x in runs]
            r = {**min(runs, key=lambda x: abs(x["error_percent"] - statistics.median(errors))),
                 "error_percent": round(statistics.median(errors), 2),
                 "error_min_max_percent": [min(errors), max(errors)], "runs": len(runs),
                 "pass": abs(statistics.median(errors)) <= 5}
            results["rate"].append(r)
            print(f"rate {rate:>8}: TCP goodput {r['goodput_bps'] / 1e6:.2f} Mbit/s, expected "
                  f"{r['expected_goodput_bps'] / 1e6:.2f} (MSS {r['mss']}): median {r['error_percent']:+.2f}% "
                  f"(min {min(errors):+.2f}%, max {max(errors):+.2f}%, {len(runs)} runs): "
                  f"{'PASS' if r['pass'] else 'FAIL'}", flush=True)
        if args.delays:
            cli("link", "set", "a", "--clear", "--cluster", args.name)
            base = ping_spread(args.name, args.pings)
            base_tcp = spread(connect_rtts(args.name, args.pings))
            results["delay_base"] = {"ping_rtt_ms": base, "tcp_connect_ms": base_tcp}
            print(f"base (nothing set): ping RTT mean {base['mean']:.3f} ms median {base['median']:.3f}, "
                  f"TCP connect mean {base_tcp['mean']:.3f} ms median {base_tcp['median']:.3f}", flush=True)
        for delay in filter(None, args.delays.split(",")):
            r = measure_delay(args.name, delay, base, base_tcp, args.pings)
            results["delay"].append(r)
            print(f"delay {delay:>7}: one way by ping {r['ping_one_way_ms']:.3f} ms (median "
                  f"{r['ping_one_way_median_ms']:.3f}, RTT p10-p90 {r['ping_rtt_p10_p90_ms']}), by TCP RTT "
                  f"{r['tcp_one_way_ms']:.3f} ms (median {r['tcp_one_way_median_ms']:.3f}, RTT p10-p90 "
                  f"{r['tcp_rtt_p10_p90_ms']}): {'PASS' if r['pass'] else 'FAIL'}", flush=True)
        if args.delays:
            r = measure_ceiling(args.name, args.duration, args.repeats)
            results["ceiling"] = r
            print(f"delay line ceiling: TCP median {r['delay_line_bps'] / 1e6:.1f} Mbit/s through it "
                  f"(delay 1us; min-max {[round(x / 1e6, 1) for x in r['delay_line_min_max_bps']]}), "
                  f"{r['plain_bps'] / 1e6:.1f} Mbit/s without (min-max "
                  f"{[round(x / 1e6, 1) for x in r['plain_min_max_bps']]}): ratio median {r['ratio_median']} "
                  f"(min-max {r['ratio_min_max']}, {r['repeats']} pairs)", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["pass"] for key in ("loss", "rate", "delay") for r in results[key]) else 1


if __name__ == "__main__":
    sys.exit(main())
