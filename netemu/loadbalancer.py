"""The cloud load balancer: what a provider puts in front of a LoadBalancer Service.

It is not a node. It lives in its own namespace (`<cluster>-lb`) on the fabric,
like an ELB in front of a cluster: the API assigns each LoadBalancer Service an
external IP from the topology's pool (status.loadBalancer.ingress); this
controller puts that IP on the balancer's eth0 and, for each port, spreads new
connections at random over the NodePort of every eligible node (all Ready nodes;
with externalTrafficPolicy Local, only those with a ready local endpoint, as a
cloud health check would find). The balancer masquerades, as a proxying cloud
balancer does, so the nodes' replies come back through it; the client's address
is therefore not seen by the pods.

The rules are one nftables table, `ip cloud-lb`, rewritten as one transaction
whenever the desired state changes, with a chain per service port and per
backend node, commented with the service they serve.
"""

from __future__ import annotations

import ipaddress
import logging

import trio

from netemu import fabric, journal, names, netns
from netemu.store import registry

log = logging.getLogger("netemu.loadbalancer")

TABLE = "cloud-lb"
RESYNC = 5.0


def create_namespace(cluster: str, mtu: int) -> str:
    ns = names.lb_ns(cluster)
    journal.create_netns(cluster, ns)
    fabric.plug(cluster, ns, "lb", None, mtu)
    netns.write_sysctl(ns, "net.ipv4.ip_forward", 1)
    # Removing the first external IP must not take the others with it.
    netns.write_sysctl(ns, "net.ipv4.conf.all.promote_secondaries", 1)
    netns.write_sysctl(ns, f"net.ipv4.conf.{names.NODE_UPLINK}.promote_secondaries", 1)
    return ns


def desired(services: list[dict], nodes: list[dict], endpoints: dict[tuple[str, str], dict]):
    """(external IPs, [(comment, ip, proto, port, [(node ip, nodePort)])]) — pure."""
    ready_nodes = {}
    for n in nodes:
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", [])):
            ip = next((a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"), None)
            if ip:
                ready_nodes[n["metadata"]["name"]] = ip
    ips, rules = set(), []
    for svc in sorted(services, key=lambda s: (s["metadata"].get("namespace", ""), s["metadata"]["name"])):
        spec = svc.get("spec", {})
        if spec.get("type") != "LoadBalancer":
            continue
        ingress = [i["ip"] for i in svc.get("status", {}).get("loadBalancer", {}).get("ingress", []) if i.get("ip")]
        if not ingress:
            continue
        ns, name = svc["metadata"].get("namespace", "default"), svc["metadata"]["name"]
        targets = sorted(ready_nodes.items())
        if spec.get("externalTrafficPolicy") == "Local":
            ep = endpoints.get((ns, name), {})
            local = {a.get("nodeName") for s in ep.get("subsets", []) for a in s.get("addresses", [])}
            targets = [(n, ip) for n, ip in targets if n in local]
        for ext in ingress:
            ips.add(ext)
            for port in spec.get("ports", []):
                if not port.get("nodePort"):
                    continue
                comment = f"{ns}/{name}:{port.get('name') or port['port']}"
                rules.append((comment, ext, port.get("protocol", "TCP").lower(), int(port["port"]),
                              [(ip, int(port["nodePort"])) for _, ip in targets]))
    return sorted(ips, key=ipaddress.IPv4Address), rules


def ruleset(rules) -> str:
    """The whole table as one nft transaction (pure): declare-then-delete empties
    any old table, then the new one is written, all or nothing."""
    jumps, chains = [], []
    for i, (comment, ext, proto, port, backends) in enumerate(rules):
        chain = f"lb-{i}"
        jumps.append(f"    ip daddr {ext} {proto} dport {port} jump {chain} comment \"{comment}\"")
        if not backends:
            chains += [f"  chain {chain} {{", f"    reject comment \"{comment}: no healthy node\"", "  }"]
            continue
        vmap = ", ".join(f"{k} : goto {chain}-node-{k}" for k in range(len(backends)))
        chains += [f"  chain {chain} {{",
                   f"    numgen random mod {len(backends)} vmap {{ {vmap} }} comment \"{comment}\"", "  }"]
        for k, (node_ip, node_port) in enumerate(backends):
            chains += [f"  chain {chain}-node-{k} {{",
                       f"    meta l4proto {proto} dnat to {node_ip}:{node_port} comment \"{comment}\"", "  }"]
    out = [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}", f"table ip {TABLE} {{", *chains,
           "  chain prerouting {", "    type nat hook prerouting priority -100; policy accept;", *jumps, "  }",
           "  chain postrouting {", "    type nat hook postrouting priority 100; policy accept;",
           "    ct status dnat masquerade comment \"replies come back through the balancer\"", "  }", "}"]
    return "\n".join(out) + "\n"


class LoadBalancerController:
    def __init__(self, cluster: str, store, settings):
        self.cluster, self.store, self.settings = cluster, store, settings
        self.ns = names.lb_ns(cluster)
        self.applied = None
        self._dirty = trio.Event()

    async def run(self) -> None:
        since = self.store.revision()
        await self._sync()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            for prefix in ("/registry/services/", registry.prefix("Node")):
                nursery.start_soon(self._watch, prefix, since)
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                await self._sync()

    async def _watch(self, prefix: str, since: int) -> None:
        """One watch per prefix. (One watch of all of /registry/ made the
        controllers' store wait on every write: each node's Lease renewal, ten
        a second at 100 nodes, woke the process for nothing.)"""
        async for _ in self.store.watch(prefix, since):
            self._dirty.set()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(RESYNC)
            self._dirty.set()

    async def _sync(self) -> None:
        services = registry.list_(self.store, "Service")
        nodes = registry.list_(self.store, "Node")
        eps = {(e["metadata"].get("namespace", "default"), e["metadata"]["name"]): e
               for e in registry.list_(self.store, "Endpoints")}
        ips, rules = desired(services, nodes, eps)
        state = (tuple(ips), tuple((c, e, p, n, tuple(b)) for c, e, p, n, b in rules))
        if state == self.applied:
            return
        try:
            await trio.to_thread.run_sync(self._apply, ips, rules)
            self.applied = state
            log.info("load balancer: %d external IPs, %d service ports", len(ips), len(rules))
        except Exception:
            log.exception("load balancer sync failed")

    def _apply(self, ips: list[str], rules) -> None:
        prefix = self.settings.underlay.prefixlen
        have = netns.run(self.ns, ["ip", "-4", "-o", "addr", "show", "dev", names.NODE_UPLINK]).stdout
        current = {line.split()[3].split("/")[0] for line in have.splitlines() if " inet " in line}
        lines = [f"addr add {ip}/{prefix} dev {names.NODE_UPLINK}" for ip in ips if ip not in current]
        lines += [f"addr del {ip}/{prefix} dev {names.NODE_UPLINK}" for ip in current if ip not in ips]
        netns.ip_batch(self.ns, lines)
        netns.run(self.ns, ["nft", "-f", "-"], input=ruleset(rules))
