"""Services in whole clusters: ClusterIP, NodePort, LoadBalancer, spread, affinity,
endpoints following pods, UDP, hairpin — in both proxy modes."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from netemu import api, cluster as clusters, clusterconfig, kubectl_verbs, names, netns
from netemu.store import registry

from .clusters import cli, lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

TOPOLOGIES = os.path.join(os.path.dirname(__file__), "..", "..", "topologies")
MODES = ["nftables", "iptables"]

# A client that opens N new TCP connections and counts which pod answered.
SPREAD = ("import collections,socket,sys\n"
          "ip,port,n=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]); seen=collections.Counter()\n"
          "for i in range(n):\n"
          " s=socket.create_connection((ip,port),timeout=3); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
          " data=b''\n"
          " while True:\n"
          "  chunk=s.recv(4096)\n"
          "  if not chunk: break\n"
          "  data+=chunk\n"
          " s.close(); seen[data.split(b'<p>pod ')[1].split(b',')[0].decode()]+=1\n"
          "print(dict(seen))")

UDP_ECHO = ("import socket,os; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',5353))\n"
            "while True:\n d,a=s.recvfrom(2048); s.sendto(os.environ['HOSTNAME'].encode(),a)")
UDP_CLIENT = ("import socket,sys,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1)\n"
              "seen=[]\n"
              "for i in range(int(sys.argv[3])):\n"
              " s.sendto(b'q',(sys.argv[1],int(sys.argv[2])))\n"
              " try: seen.append(s.recv(100).decode())\n"
              " except socket.timeout: seen.append('-')\n"
              " time.sleep(float(sys.argv[4]))\n"
              "print(' '.join(seen))")


def rc(name, replicas, containers, labels):
    return {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": labels,
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": containers}}}}


def web_containers():
    return [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]


def ready_pods(store, labels):
    out = []
    for p in registry.list_(store, "Pod"):
        if all(p["metadata"].get("labels", {}).get(k) == v for k, v in labels.items()) and \
                not p["metadata"].get("deletionTimestamp") and \
                any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", [])):
            out.append(p)
    return out


def endpoints_ips(store, name):
    ep = registry.get(store, "Endpoints", "default", name)
    if not ep:
        return set()
    return {a["ip"] for s in ep.get("subsets", []) for a in s.get("addresses", [])}


def pexec(cluster, pod, *argv, check=True):
    return cli("exec", "--cluster", cluster, pod, "--", *argv, check=check)


def settings(cluster):
    return clusterconfig.read(cluster).settings


@pytest.mark.parametrize("mode", MODES)
def test_tutorial_sections_3_and_4(mode):
    """Two replicas behind `expose rc podtoservcie --port=80`; a pod on another node
    reaches both through the ClusterIP; `expose ... --type=LoadBalancer` answers on
    every node's NodePort and on the external IP from the outside client."""
    top = os.path.join(TOPOLOGIES, "tutorial.yaml")
    with lab(top, name=f"ts-tut-{mode[:3]}", proxy_mode=mode) as built:
        cluster = built.name
        store = clusters.open_store(cluster)
        objs = [o for o in __import__("netemu.topology.manifests", fromlist=["x"]).load_manifests(
            os.path.join(TOPOLOGIES, "tutorial", "nginx-rc.yaml"), settings(cluster))[0]]
        for o in objs:
            api.create_or_update(store, o, settings(cluster))
        pods = wait_for(lambda: len(ready_pods(store, {"app": "nginx"})) == 2 and ready_pods(store, {"app": "nginx"}),
                        timeout=30, what="two nginx replicas")
        assert all(p["metadata"]["name"].startswith("podtoservcie-") for p in pods)
        svc = kubectl_verbs.expose(store, "rc", "podtoservcie", port=80, settings=settings(cluster))
        vip = svc["spec"]["clusterIP"]
        assert __import__("ipaddress").IPv4Address(vip) in settings(cluster).service_range
        wait_for(lambda: len(endpoints_ips(store, "podtoservcie")) == 2, what="endpoints")
        # From nginxpod (on one node), the ClusterIP reaches both replicas.
        seen = {}
        wait_for(lambda: pexec(cluster, "nginxpod", "curl", "-s", "-m", "2", vip, check=False).returncode == 0,
                 what="the ClusterIP to answer")
        for _ in range(40):
            body = pexec(cluster, "nginxpod", "curl", "-s", "-m", "3", vip).stdout
            seen[body.split("<p>pod ")[1].split(",")[0]] = True
            if len(seen) == 2:
                break
        assert set(seen) == {p["metadata"]["name"] for p in pods}
        # The rules name the service, as the tutorial's grep shows.
        node = names.node_ns(cluster, "srv-k8s-node1")
        rules = netns.run(node, ["nft", "list", "ruleset"] if mode == "nftables"
                          else ["iptables-save", "-t", "nat"]).stdout
        assert "default/podtoservcie" in rules

        lb = kubectl_verbs.expose(store, "rc", "podtoservcie", port=80, type_="LoadBalancer",
                        name_override="my-second-service", settings=settings(cluster))
        node_port = lb["spec"]["ports"][0]["nodePort"]
        assert 30000 <= node_port <= 32767
        ext = wait_for(lambda: (registry.get(store, "Service", "default", "my-second-service")
                                .get("status", {}).get("loadBalancer", {}).get("ingress") or [{}])[0].get("ip"),
                       what="an external IP")
        described = cli("describe", "--cluster", cluster, "service", "my-second-service").stdout
        assert "LoadBalancer" in described
        for n in registry.list_(store, "Node"):
            addr = n["status"]["addresses"][0]["address"]
            out = wait_for(lambda: cli("client", "--cluster", cluster, "exec", "--", "curl", "-s", "-m", "3",
                                       f"{addr}:{node_port}", check=False).stdout, what=f"NodePort on {addr}")
            assert "<p>pod podtoservcie-" in out
        out = wait_for(lambda: cli("client", "--cluster", cluster, "exec", "--", "curl", "-s", "-m", "3",
                                   f"{ext}:80", check=False).stdout, what="the external IP")
        assert "<p>pod podtoservcie-" in out
        rules = netns.run(node, ["nft", "list", "ruleset"] if mode == "nftables"
                          else ["iptables-save", "-t", "nat"]).stdout
        assert "default/my-second-service" in rules


@pytest.mark.parametrize("mode", MODES)
def test_spread_affinity_endpoints_follow_pods(mode):
    topology = {"name": f"ts-spread-{mode[:3]}", "cluster": {"proxyMode": mode},
        "nodes": [{"name": "n1"}, {"name": "n2"}],
        "workloads": [
            rc("web", 4, web_containers(), {"app": "web"}),
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
             "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox",
                                                        "command": ["sleep", "infinity"]}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sticky"},
             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], "sessionAffinity": "ClientIP"}},
        ]}
    with lab(topology) as built:
        cluster = built.name
        store = clusters.open_store(cluster)
        wait_for(lambda: len(endpoints_ips(store, "web")) == 4, timeout=30, what="4 endpoints")
        vip = registry.get(store, "Service", "default", "web")["spec"]["clusterIP"]
        sticky = registry.get(store, "Service", "default", "sticky")["spec"]["clusterIP"]
        wait_for(lambda: pexec(cluster, "client", "curl", "-s", "-m", "2", vip,
                               check=False).returncode == 0, what="the service to answer")
        counts = json.loads(pexec(cluster, "client", sys.executable, "-c", SPREAD, vip, "80", "1000")
                            .stdout.replace("'", '"'))
        assert sum(counts.values()) == 1000 and len(counts) == 4
        chi2 = sum((c - 250) ** 2 / 250 for c in counts.values())
        assert chi2 < 16.27, f"not uniform (chi-square {chi2:.1f}, p < 0.001): {counts}"
        counts = json.loads(pexec(cluster, "client", sys.executable, "-c", SPREAD, sticky, "80", "50")
                            .stdout.replace("'", '"'))
        assert len(counts) == 1, f"ClientIP affinity spread connections: {counts}"

        # Delete a pod: its endpoint leaves the rules, and no connection goes there.
        victim = ready_pods(store, {"app": "web"})[0]
        victim_ip = victim["status"]["podIP"]
        node_ns = names.node_ns(cluster, "n1")
        listing = ["nft", "list", "ruleset"] if mode == "nftables" else ["iptables-save", "-t", "nat"]
        assert victim_ip in netns.run(node_ns, listing).stdout
        t0 = time.monotonic()
        api.delete_pod(store, "default", victim["metadata"]["name"])
        wait_for(lambda: victim_ip not in netns.run(node_ns, listing).stdout, timeout=10, interval=0.02,
                 what="the endpoint to leave the rules")
        elapsed = time.monotonic() - t0
        print(f"[{mode}] endpoint removed from n1's rules {elapsed * 1000:.0f} ms after the pod was deleted")
        counts = json.loads(pexec(cluster, "client", sys.executable, "-c", SPREAD, vip, "80", "100")
                            .stdout.replace("'", '"'))
        assert victim["metadata"]["name"] not in counts


@pytest.mark.parametrize("mode", MODES)
def test_udp_service_follows_endpoint_change_and_hairpin(mode):
    topology = {"name": f"ts-udp-{mode[:3]}", "cluster": {"proxyMode": mode},
        "nodes": [{"name": "n1"}, {"name": "n2"}],
        "workloads": [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dns1", "labels": {"app": "dns"}},
             "spec": {"nodeName": "n2", "containers": [
                 {"name": "echo", "image": "python", "command": [sys.executable, "-c", UDP_ECHO]},
                 {"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
             "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox",
                                                        "command": ["sleep", "infinity"]}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns"},
             "spec": {"selector": {"app": "dns"}, "ports": [{"name": "dns", "port": 53, "targetPort": 5353,
                                                             "protocol": "UDP"},
                                                            {"name": "http", "port": 8080, "targetPort": 80}]}},
        ]}
    with lab(topology) as built:
        cluster = built.name
        store = clusters.open_store(cluster)
        vip = registry.get(store, "Service", "default", "dns")["spec"]["clusterIP"]
        wait_for(lambda: endpoints_ips(store, "dns"), what="an endpoint")
        # Hairpin: dns1 reaches itself through its own service.
        out = wait_for(lambda: cli("exec", "--cluster", cluster, "dns1", "-c", "web", "--", "curl", "-s", "-m",
                                   "3", f"{vip}:8080", check=False).stdout, what="hairpin")
        assert "pod dns1" in out
        # One UDP client socket keeps asking while the endpoint is replaced.
        import subprocess
        client = subprocess.Popen(
            [sys.executable, "-m", "netemu.cli", "exec", "--cluster", cluster, "client", "--",
             sys.executable, "-c", UDP_CLIENT, vip, "53", "40", "0.25"], stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        api.create_or_update(store, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": "dns2", "namespace": "default", "labels": {"app": "dns"}},
                                     "spec": {"nodeName": "n1", "restartPolicy": "Always", "containers": [
                                         {"name": "echo", "image": "python",
                                          "command": [sys.executable, "-c", UDP_ECHO]}]}}, settings(cluster))
        wait_for(lambda: len(endpoints_ips(store, "dns")) == 2, what="the second endpoint")
        api.delete_pod(store, "default", "dns1")
        out, _ = client.communicate(timeout=60)
        answers = out.split()
        assert answers[0] == "dns1"
        assert answers[-1] == "dns2", f"the client never moved to the new endpoint: {answers}"
