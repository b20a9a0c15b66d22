"""Pod to pod across nodes, for each overlay backend, in whole clusters."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

from netemu import cluster as clusters, names, netns
from netemu.capture.decode import decode_pcap
from netemu.capture.tcpdump import capture
from netemu.overlay import subnetenv
from netemu.overlay import stats as overlay_stats
from netemu.store import registry

from .clusters import cli, running, wait_for, write_topology

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

TOPOLOGIES = os.path.join(os.path.dirname(__file__), "..", "..", "topologies")

UDP_ECHO = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',9999));\n"
            "while True:\n d,a=s.recvfrom(2048); s.sendto(b'echo:'+d,a)")
UDP_CLIENT = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2);\n"
              "for i in range(5):\n"
              "  s.sendto(b'hello',(sys.argv[1],9999))\n"
              "  try:\n   print(s.recvfrom(2048)[0].decode()); break\n  except socket.timeout: pass")


UDP_UNREACHABLE = ("import errno,socket,sys,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);\n"
                   # Net unreachable is a soft error for UDP: only IP_RECVERR shows it.
                   "s.setsockopt(socket.SOL_IP, 11, 1)  # IP_RECVERR\n"
                   "s.connect((sys.argv[1],9)); s.settimeout(2)\n"
                   "try:\n s.send(b'x'); s.recv(100)\n"
                   "except OSError as e: print(errno.errorcode.get(e.errno, e))")


def web(name, node, extra_containers=()):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [
                {"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]},
                {"name": "udp-echo", "image": "python", "command": [sys.executable, "-c", UDP_ECHO]},
                *extra_containers]}}


def two_nodes(tmp_path, name, backend):
    return write_topology(tmp_path, name, {
        "cluster": {"backend": backend},
        "nodes": [{"name": "n1"}, {"name": "n2"}],
        "workloads": [web("a1", "n1"), web("a2", "n1"), web("b1", "n2")]})


def pod_ips(store):
    return {p["metadata"]["name"]: p["status"]["podIP"] for p in registry.list_(store, "Pod")}


def pexec(cluster, pod, *argv, check=True):
    return cli("exec", "--cluster", cluster, pod, "-c", "web", "--", *argv, check=check)


def ping_ttl(cluster, pod, ip):
    out = pexec(cluster, pod, "ping", "-c", "1", "-W", "3", ip).stdout
    return int(re.search(r"ttl=(\d+)", out).group(1))


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_pod_to_pod_across_nodes(tmp_path, backend):
    name = f"to-{backend.replace('-', '')}"
    with running(two_nodes(tmp_path, name, backend)) as (cluster, _):
        store = clusters.open_store(cluster)
        ips = pod_ips(store)
        # TCP, UDP and ICMP, both ways
        for src, dst in (("a1", "b1"), ("b1", "a1")):
            assert f"pod {dst}" in pexec(cluster, src, "curl", "-s", "-m", "5", ips[dst]).stdout
            udp = pexec(cluster, src, sys.executable, "-c", UDP_CLIENT, ips[dst]).stdout
            assert "echo:hello" in udp
            assert ping_ttl(cluster, src, ips[dst]) > 0
        # from a node to a remote pod
        out = netns.run(names.node_ns(cluster, "n1"), ["curl", "-s", "-m", "5", ips["b1"]]).stdout
        assert "pod b1" in out

        # On the wire: capture n1's eth0 while a1 talks to b1 (and a1 to a2).
        pcap = str(tmp_path / "n1-eth0.pcap")
        with capture(names.node_ns(cluster, "n1"), "eth0", pcap, "ip"):
            pexec(cluster, "a1", "curl", "-s", "-m", "5", ips["b1"])
            pexec(cluster, "a1", "curl", "-s", "-m", "5", ips["a2"])
        seen = [d for d in decode_pcap(pcap) if d.inner is not None and d.kind == "ipv4"]
        assert seen
        flows = {(d.inner.src, d.inner.dst): d for d in seen}
        across = flows.get((ips["a1"], ips["b1"]))
        assert across is not None, "a1 -> b1 never crossed n1's eth0"
        expected = {"udp": "udp", "vxlan": "vxlan", "host-gw": None}[backend]
        assert across.encapsulation == expected
        if backend == "udp":
            assert across.outer.proto == "UDP" and across.outer.dport == 8285
        elif backend == "vxlan":
            assert across.outer.dport == 8472 and across.vni == 1
        # Same-node traffic (a1 -> a2) stays on docker0: never on the underlay.
        assert (ips["a1"], ips["a2"]) not in flows


def test_tutorial_addresses_match_the_tutorial(tmp_path):
    """`ip add | grep inet` on the tutorial's node2: docker0 192.168.96.1/24 and
    flannel0 192.168.96.0/16, as printed in the tutorial."""
    with running(os.path.join(TOPOLOGIES, "tutorial.yaml"), name="to-tut") as (cluster, _):
        out = netns.run(names.node_ns(cluster, "srv-k8s-node2"), ["ip", "add"]).stdout
        inet = [l.strip() for l in out.splitlines() if "inet " in l]
        assert any(l.startswith("inet 10.1.96.233/24") and l.endswith("eth0") for l in inet)
        assert any(l.startswith("inet 192.168.96.1/24") and l.endswith("docker0") for l in inet)
        assert any(l.startswith("inet 192.168.96.0/16") and l.endswith("flannel0") for l in inet)
        env = subnetenv.read(names.node_dir(cluster, "srv-k8s-node2"))
        assert str(env.network) == "192.168.0.0/16" and str(env.subnet) == "192.168.96.1/24"
        assert env.mtu == 1472
        # Every pod's eth0 has the overlay's MTU, so nothing black-holes.
        for pod in ("nginxpod",):
            link = cli("exec", "--cluster", cluster, pod, "--", "ip", "-j", "link", "show", "eth0").stdout
            assert json.loads(link)[0]["mtu"] == 1472


def test_daemon_killed_is_restarted_and_keeps_its_subnet(tmp_path):
    with running(two_nodes(tmp_path, "to-kill", "udp")) as (cluster, _):
        store = clusters.open_store(cluster)
        ips = pod_ips(store)
        env_before = subnetenv.read(names.node_dir(cluster, "n2"))
        pid = overlay_stats.read(store, "n2")["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)

        def back():
            # A new daemon publishes its record at once.
            data = overlay_stats.read(store, "n2")
            return data is not None and data["pid"] != pid and data["pid"]
        wait_for(back, timeout=20, what="overlay daemon restart")
        ok = wait_for(lambda: "pod b1" in pexec(cluster, "a1", "curl", "-s", "-m", "2", ips["b1"],
                                                check=False).stdout, timeout=20, what="traffic to resume")
        print(f"overlay daemon restart: traffic resumed after {time.monotonic() - t0:.2f} s")
        assert ok
        assert subnetenv.read(names.node_dir(cluster, "n2")).subnet == env_before.subnet
        assert pod_ips(store)["b1"] == ips["b1"]


def test_node_added_and_removed(tmp_path):
    with running(two_nodes(tmp_path, "to-join", "vxlan")) as (cluster, _):
        store = clusters.open_store(cluster)
        cli("node", "--cluster", cluster, "add", "n3")
        n3 = registry.get(store, "Node", None, "n3")
        subnet = n3["spec"]["podCIDR"]
        gw = subnet.rsplit(".", 1)[0] + ".1"
        # n1 reaches n3's docker0 through the overlay
        assert wait_for(lambda: "1 received" in pexec(cluster, "a1", "ping", "-c", "1", "-W", "2", gw,
                                                      check=False).stdout, what="route to the new node")
        routes = netns.run(names.node_ns(cluster, "n1"), ["ip", "route"]).stdout
        assert subnet in routes
        cli("node", "--cluster", cluster, "remove", "n3")
        wait_for(lambda: subnet not in netns.run(names.node_ns(cluster, "n1"), ["ip", "route"]).stdout,
                 what="route to the removed node to disappear")
        assert not netns.exists(names.node_ns(cluster, "n3"))


def test_unleased_subnet_gets_net_unreachable_and_ttl(tmp_path):
    with running(two_nodes(tmp_path, "to-icmp", "udp")) as (cluster, _):
        store = clusters.open_store(cluster)
        ips = pod_ips(store)
        held = {kv.key for kv in store.list("/coreos.com/network/subnets/")}
        free = next(f"10.244.{i}.7" for i in range(2, 250)
                    if f"/coreos.com/network/subnets/10.244.{i}.0-24" not in held)
        # flannel answers for UDP and TCP, never for ICMP (no errors about ICMP):
        # a connected UDP socket sees the net unreachable as ENETUNREACH.
        out = pexec(cluster, "a1", sys.executable, "-c", UDP_UNREACHABLE, free, check=False)
        assert "ENETUNREACH" in out.stdout, out.stdout + out.stderr
        # (the daemon publishes its counters once a second)
        wait_for(lambda: json.loads(cli("stats", "--cluster", cluster, "n1", "-o", "json").stdout)
                 ["n1"]["counters"]["icmp_unreachable_sent"] >= 1, timeout=5, what="the ICMP counter")
        udp_ttl = ping_ttl(cluster, "a1", ips["b1"])
    with running(two_nodes(tmp_path, "to-ttlgw", "host-gw")) as (cluster, _):
        gw_ttl = ping_ttl(cluster, "a1", pod_ips(clusters.open_store(cluster))["b1"])
    # flannel's udp proxy decrements the TTL once on each side (tun_to_udp and
    # udp_to_tun), on top of the kernel's own forwarding hops that host-gw has too.
    assert udp_ttl == gw_ttl - 2
