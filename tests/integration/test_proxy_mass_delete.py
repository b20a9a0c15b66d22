"""Issue 12 item 9 on a whole cluster (names hfmass*): 29 UDP services of 200
endpoints each deleted at once do not hold up the next service.

The proxy daemons of both nodes see the deletions and the service created
right after; it must be in every node's rules within a couple of seconds (the
issue measured 66 s, one `conntrack -D` per endpoint in series before the next
sync). The live UDP flows a pod had to those services are gone from its node's
conntrack table afterwards, deleted by the daemon's clean-up task (one dump
per clean-up, logged in proxy.log).

The services have no selector and their Endpoints are written here, as a user
may in Kubernetes; the endpoint addresses answer nothing (a datagram DNATed to
one still leaves a conntrack entry on the client's node); they lie outside both
nodes' subnets, which the topology fixes.
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from netemu import api, cluster as clusters, clusterconfig, names, netns

from .clusters import cli, lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SERVICES, ENDPOINTS, FLOWS = 29, 200, 10
EP_IPS = [f"10.244.{200 + j // 250}.{j % 250 + 1}" for j in range(ENDPOINTS)]
UDP = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
SEND = ("import socket,sys\n"
        "for i,vip in enumerate(sys.argv[1:]):\n"
        " for k in range(%d):\n"
        "  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',20000+i*100+k))\n"
        "  s.sendto(b'q',(vip,53)); s.close()\n" % FLOWS)


def service(name):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": UDP}}


def endpoints(name, ips):
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": "default"},
            "subsets": [{"addresses": [{"ip": ip} for ip in ips],
                         "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}]}]}


def rules(cluster, node, mode):
    argv = ["nft", "list", "map", "ip", "kube-proxy", "service-ips"] if mode == "nftables" \
        else ["iptables-save", "-t", "nat"]
    return netns.run(names.node_ns(cluster, node), argv, check=False).stdout


def udp_entries_to(cluster, node, vips):
    out = netns.run(names.node_ns(cluster, node), ["conntrack", "-L", "-p", "udp"], check=False).stdout
    return [line for line in out.splitlines() if re.search(r"dst=(\S+)", line).group(1) in vips]


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_mass_delete_does_not_hold_up_the_next_service(mode):
    cluster = f"hfmass{mode[:3]}"
    with lab({"name": cluster, "cluster": {"proxyMode": mode},
              # Subnets of their own: a node that drew 10.244.200.0/24 would
              # have the endpoints below on its own bridge (seen once in CI:
              # 4 conntrack entries of 290).
              "nodes": [{"name": "n1", "podCIDR": "10.244.1.0/24"},
                        {"name": "n2", "podCIDR": "10.244.2.0/24"}],
              "workloads": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
                             "spec": {"nodeName": "n1", "containers": [
                                 {"name": "c", "image": "busybox", "command": ["sleep", "infinity"]}]}}]}):
        store = clusters.open_store(cluster)
        settings = clusterconfig.read(cluster).settings
        try:
            vips = set()
            for i in range(SERVICES):
                svc, _ = api.create_or_update(store, service(f"u{i}"), settings)
                api.create_or_update(store, endpoints(f"u{i}", EP_IPS), settings)
                vips.add(svc["spec"]["clusterIP"])
            for node in ("n1", "n2"):
                wait_for(lambda: all(v in rules(cluster, node, mode) for v in vips), timeout=60,
                         what=f"the 29 services in {node}'s rules")
            cli("exec", "--cluster", cluster, "client", "--", sys.executable, "-c", SEND, *sorted(vips),
                timeout=60)
            assert len(udp_entries_to(cluster, "n1", vips)) == SERVICES * FLOWS

            t0 = time.monotonic()
            for i in range(SERVICES):
                api.delete(store, "Service", "default", f"u{i}")     # its Endpoints go with it
            late, _ = api.create_or_update(store, service("late"), settings)
            api.create_or_update(store, endpoints("late", EP_IPS[:1]), settings)
            late_vip = late["spec"]["clusterIP"]
            for node in ("n1", "n2"):
                wait_for(lambda: late_vip in rules(cluster, node, mode), timeout=10, interval=0.05,
                         what=f"the new service in {node}'s rules")
            late_in = time.monotonic() - t0
            assert late_in < 2.0, f"the new service was in every node's rules {late_in:.2f} s after the delete"
            for node in ("n1", "n2"):
                wait_for(lambda: not any(v in rules(cluster, node, mode) for v in vips), timeout=10,
                         what=f"the 29 services gone from {node}'s rules")
            wait_for(lambda: not udp_entries_to(cluster, "n1", vips), timeout=10,
                     what="the stale UDP conntrack entries deleted")
            with open(os.path.join(names.node_dir(cluster, "n1"), "proxy.log")) as f:
                cleanups = re.findall(r"conntrack: (\d+) stale flows, (\d+) entries deleted", f.read())
            assert sum(int(d) for _, d in cleanups) == SERVICES * FLOWS
            # (plus the "first endpoint" flows of the services' creation)
            assert sum(int(n) for n, _ in cleanups) >= SERVICES * ENDPOINTS
            print(f"\n{mode}: new service in every node's rules {late_in:.2f} s after deleting "
                  f"{SERVICES}x{ENDPOINTS} UDP endpoints; {len(cleanups)} conntrack clean-ups")
        finally:
            store.close()
