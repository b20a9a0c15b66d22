#!/usr/bin/env python3
"""exec and port-forward through the API server, WebSocket against SPDY (a
benchmark, not a test).

    sudo .venv/bin/python tools/bench_streams.py [--rounds 7] [--size-mb 20] [--name bench-streams]

Builds a two-node cluster with one busybox pod and one web pod, then per round:
  - exec: the wall time of `kubectl exec POD -- true`, with the newest kubectl
    (WebSocket v5.channel.k8s.io) and with kubectl 1.29 (SPDY/3.1);
  - port-forward: a SIZE MB download with curl from the web pod, directly from
    the master node's namespace over the overlay (the baseline), and through
    `kubectl port-forward` with kubectl 1.29 (SPDY) and the newest (SPDY in a
    WebSocket).
Prints each figure's median and its spread (min-max), and ratios: SPDY exec to
WebSocket exec, each port-forward to the direct download. The cluster is torn
down at the end, even on failure.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netemu import apiserver, names  # noqa: E402
from netemu import cluster as clusters  # noqa: E402
from netemu.topology.loader import load_topology  # noqa: E402

NEWEST = shutil.which("kubectl") or "/usr/bin/kubectl"
SPDY_KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.29"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3g} (min {min(values):.3g}, max {max(values):.3g}, n={len(values)})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size-mb", type=int, default=20)
    ap.add_argument("--name", default="bench-streams", help="the throw-away cluster's name")
    ap.add_argument("--wait-lock", action="store_true", help="wait for another benchmark to finish")
    args = ap.parse_args()
    for binary in (NEWEST, SPDY_KUBECTL):
        if not os.path.exists(binary):
            sys.exit(f"bench_streams: {binary} is missing")
    lock = open("/run/netemu-bench.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | (0 if args.wait_lock else fcntl.LOCK_NB))
    except BlockingIOError:
        sys.exit("another benchmark is running (/run/netemu-bench.lock); try --wait-lock")
    name = args.name
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"name": name, "cluster": {"timeScale": 0.01},
                            "nodes": [{"name": "m1", "unschedulable": True}, {"name": "w1"}],
                            "workloads": [
                                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sh"},
                                 "spec": {"containers": [{"name": "sh", "image": "busybox",
                                                          "command": ["sleep", "infinity"]}]}},
                                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                                 "spec": {"containers": [{"name": "web", "image": "nginx",
                                                          "ports": [{"containerPort": 80}]}]}}]}, f)
        try:
            clusters.up(load_topology(path), kubeconfig=False)
            server = f"http://127.0.0.1:{apiserver.read_config(name)['port']}"

            def kubectl(binary: str, *argv: str) -> list[str]:
                return [binary, "--server", server, "--cache-dir", os.path.join(tmp, os.path.basename(binary)),
                        *argv]

            www = os.path.join(names.pod_dir(name, "default", "web"), "web", "www")
            with open(os.path.join(www, "big"), "wb") as f:
                f.write(os.urandom(args.size_mb * 1_000_000))
            pod_ip = subprocess.run(kubectl(NEWEST, "get", "pod", "web", "-o", "jsonpath={.status.podIP}"),
                                    capture_output=True, text=True, check=True).stdout
            for binary in (NEWEST, SPDY_KUBECTL):       # warm: discovery cached, both pods answering
                subprocess.run(kubectl(binary, "exec", "sh", "--", "true"), check=True, timeout=60)

            exec_s = {"websocket": [], "spdy": []}
            mbps = {"direct": [], "spdy": [], "websocket": []}
            for _ in range(args.rounds):
                for proto, binary in (("websocket", NEWEST), ("spdy", SPDY_KUBECTL)):
                    t0 = time.monotonic()
                    subprocess.run(kubectl(binary, "exec", "sh", "--", "true"), check=True, timeout=60)
                    exec_s[proto].append(time.monotonic() - t0)
                curl = ["curl", "-s", "-m", "120", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}"]
                out = subprocess.run(["ip", "netns", "exec", names.node_ns(name, "m1"), *curl,
                                      f"http://{pod_ip}/big"], capture_output=True, text=True, check=True).stdout
                mbps["direct"].append(float(out.split()[1]) / 1e6)
                for proto, binary in (("spdy", SPDY_KUBECTL), ("websocket", NEWEST)):
                    port = free_port()
                    pf = subprocess.Popen(kubectl(binary, "port-forward", "pod/web", f"{port}:80"),
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                    try:
                        pf.stdout.readline()                    # "Forwarding from ..."
                        out = subprocess.run([*curl, f"http://127.0.0.1:{port}/big"], capture_output=True,
                                             text=True, check=True).stdout
                    finally:
                        pf.terminate()
                        pf.wait(timeout=20)
                    size, speed = out.split()
                    if int(size) != args.size_mb * 1_000_000:
                        sys.exit(f"bench_streams: port-forward ({proto}) gave {size} bytes")
                    mbps[proto].append(float(speed) / 1e6)
        finally:
            clusters.teardown(name, graceful=False)
    print(f"exec `true` round trip, seconds ({args.rounds} rounds)")
    for proto, values in exec_s.items():
        print(f"  {proto:10} {spread(values)}")
    ratios = [s / w for s, w in zip(exec_s["spdy"], exec_s["websocket"])]
    print(f"  spdy/websocket per round: {spread(ratios)}")
    print(f"download of {args.size_mb} MB, MB/s")
    for proto, values in mbps.items():
        print(f"  {proto:10} {spread(values)}")
    for proto in ("spdy", "websocket"):
        ratios = [p / d for p, d in zip(mbps[proto], mbps["direct"])]
        print(f"  port-forward {proto}/direct per round: {spread(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
