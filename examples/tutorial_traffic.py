#!/usr/bin/env python3
"""The tutorial's four kinds of traffic, as a script (run as root):

  1. container to container in one pod, over localhost
  2. pod to pod across nodes, through the overlay
  3. pod to a service's ClusterIP (DNAT by the node's proxy rules)
  4. from outside the cluster (the external client) to a NodePort and to a
     LoadBalancer's external IP

It builds the tutorial's cluster (topologies/tutorial.yaml, written here as a
dict), makes each kind of traffic, prints what it saw, and tears the cluster
down at the end, whatever happens:

    python3 examples/tutorial_traffic.py [--name pytutorial] [--backend udp|vxlan|host-gw]

Exit status 0 when all four worked.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import netemu

TUTORIAL = Path(__file__).resolve().parent.parent / "topologies" / "tutorial"


def topology(name: str, backend: str) -> dict:
    # topologies/tutorial.yaml, as data.
    return {
        "name": name,
        "cluster": {"underlay": "10.1.96.0/24", "clusterNetwork": "192.168.0.0/16", "subnetLen": 24,
                    "serviceRange": "10.254.0.0/16", "backend": backend},
        "nodes": [
            {"name": "srv-k8s-master1", "address": "10.1.96.231", "unschedulable": True,
             "labels": {"node-role.kubernetes.io/master": ""}},
            {"name": "srv-k8s-node1", "address": "10.1.96.232"},
            {"name": "srv-k8s-node2", "address": "10.1.96.233", "podCIDR": "192.168.96.0/24"},
        ],
        "workloads": [str(TUTORIAL / "nginxpod.yaml")],
    }


def show(number: int, what: str, result) -> bool:
    """Print one kind of traffic: what ran, its exit status, the first line of
    what came back."""
    # The web servers' page names the pod, container and node that served it.
    lines = [re.sub(r"<[^>]*>", "", line).strip() for line in result.stdout.splitlines()]
    answer = ([line for line in lines if line] or [result.stderr.strip() or "(nothing)"])[-1]
    print(f"{number}. {what}\n   {' '.join(result.args)}  ->  exit {result.returncode}: {answer}")
    return result.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="pytutorial", help="cluster name")
    parser.add_argument("--backend", default="udp", choices=["udp", "vxlan", "host-gw"])
    args = parser.parse_args()

    ok = []
    with netemu.up(topology(args.name, args.backend)) as cluster:
        print(f'cluster "{cluster.name}" is up ({args.backend} backend)\n')
        nginxpod = cluster.pods["nginxpod"]

        # 1. Both containers share the pod's network namespace: nginx80 reaches
        #    nginx8800's server on localhost.
        ok.append(show(1, "container to container over localhost (nginxpod: nginx80 -> nginx8800)",
                       nginxpod.exec(["curl", "-s", "-m", "5", "localhost:8800"], container="nginx80")))

        # 2. The tutorial's replication controller puts a replica on the other node.
        cluster.apply(TUTORIAL / "nginx-rc.yaml")
        cluster.wait()
        replicas = [cluster.pods[p["metadata"]["name"]] for p in cluster.get("pods", selector="app=nginx")]
        remote = next(p for p in replicas if p.node != nginxpod.node)
        with tempfile.TemporaryDirectory() as tmp:
            pcap = f"{tmp}/uplink.pcap"
            # On nginxpod's node's uplink, the request is seen inside the overlay's packets.
            with cluster.capturing(f"node/{nginxpod.node}", pcap, f"host {cluster.nodes[remote.node].address}"):
                result = nginxpod.exec(["curl", "-s", "-m", "5", f"{remote.ip}:80"])
            ok.append(show(2, f"pod to pod across nodes ({nginxpod.name} on {nginxpod.node} -> "
                              f"{remote.name} on {remote.node})", result))
            from netemu.capture.decode import format_decoded
            packets = [d for d in cluster.packets(pcap) if d.inner is not None and remote.ip in
                       (d.inner.src, d.inner.dst)]               # the pods' packets, not ARP
            print(f"   seen on {nginxpod.node}'s eth0: {len(packets)} packets of the request, the first:")
            for d in packets[:1]:
                print(f"   {format_decoded(d)}")

        # 3. A ClusterIP service in front of the replicas.
        svc = cluster.expose("rc", "podtoservcie", 80)
        cluster_ip = svc["spec"]["clusterIP"]
        ok.append(show(3, f"pod to service ClusterIP (nginxpod -> podtoservcie {cluster_ip}:80)",
                       nginxpod.exec(["curl", "-s", "-m", "5", f"{cluster_ip}:80"], retry=10)))

        # 4. From outside: a LoadBalancer service has a NodePort on every node and
        #    an external IP on the cloud load balancer.
        lb = cluster.expose("rc", "podtoservcie", 80, type="LoadBalancer", service_name="my-second-service")
        node_port = lb["spec"]["ports"][0]["nodePort"]
        external_ip = lb["status"]["loadBalancer"]["ingress"][0]["ip"]
        node_address = cluster.nodes["srv-k8s-node1"].address
        ok.append(show(4, f"client to NodePort ({node_address}:{node_port})",
                       cluster.client.exec(["curl", "-s", "-m", "5", f"{node_address}:{node_port}"], retry=10)))
        ok.append(show(4, f"client to LoadBalancer external IP ({external_ip}:80)",
                       cluster.client.exec(["curl", "-s", "-m", "5", f"{external_ip}:80"], retry=10)))
    print(f'\ncluster "{args.name}" removed; {sum(ok)} of {len(ok)} worked')
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
