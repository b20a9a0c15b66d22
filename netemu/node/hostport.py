"""hostPort: a node publishes a container port on its own address.

This is the CNI portmap plugin's job on a real node: DNAT from the node's address
and the hostPort to the pod's IP and containerPort, for packets arriving from the
network (prerouting) and for the node's own processes (output). netemu writes it
as one nftables table per node, `ip cni-portmap`, with a chain per pod so a pod's
mappings come and go as one unit, and a comment naming the pod on every rule.
"""

from __future__ import annotations

import dataclasses

from netemu import netns

TABLE = "cni-portmap"


@dataclasses.dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str        # tcp | udp
    pod_ip: str
    container: str


def mappings(pod: dict, pod_ip: str) -> list[PortMapping]:
    out = []
    for c in pod["spec"].get("containers", []):
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(PortMapping(int(p["hostPort"]), int(p["containerPort"]),
                                       p.get("protocol", "TCP").lower(), pod_ip, c["name"]))
    return out


def chain_name(pod_key: str) -> str:
    return "pod-" + pod_key.replace("/", "-")


def base_table() -> str:
    # `fib daddr type local`: only packets addressed to this node are mapped, as
    # portmap does with its "-m addrtype --dst-type LOCAL" match. Node-local
    # clients (127.0.0.1) need SNAT so that the pod's reply comes back to the node.
    return (f"table ip {TABLE} {{\n"
            f"  chain hostports {{\n  }}\n"
            f"  chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n"
            f"    fib daddr type local jump hostports\n  }}\n"
            f"  chain output {{\n    type nat hook output priority -100; policy accept;\n"
            f"    fib daddr type local jump hostports\n  }}\n"
            f"  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n"
            f"    ct status dnat ip saddr 127.0.0.0/8 masquerade\n  }}\n"
            f"}}\n")


def add_script(pod_key: str, maps: list[PortMapping]) -> str:
    chain = chain_name(pod_key)
    lines = [f"add chain ip {TABLE} {chain}", f"flush chain ip {TABLE} {chain}"]
    for m in maps:
        comment = f'"{pod_key} {m.container} hostPort {m.host_port}/{m.protocol}"'
        lines.append(f"add rule ip {TABLE} {chain} {m.protocol} dport {m.host_port} "
                     f"dnat to {m.pod_ip}:{m.container_port} comment {comment}")
    lines.append(f"add rule ip {TABLE} hostports jump {chain} comment \"{pod_key}\"")
    return "\n".join(lines) + "\n"


def add(node_ns: str, pod_key: str, maps: list[PortMapping]) -> None:
    # The base chains and their rules are written once, when the table is new
    # (declaring them again would append their rules again).
    if netns.run(node_ns, ["nft", "list", "table", "ip", TABLE], check=False).returncode != 0:
        netns.run(node_ns, ["nft", "-f", "-"], input=base_table())
    netns.run(node_ns, ["nft", "-f", "-"], input=add_script(pod_key, maps))
    # Pods and the node reach hostPorts via 127.0.0.1 only with route_localnet.
    netns.write_sysctl(node_ns, "net.ipv4.conf.all.route_localnet", 1)


def remove(node_ns: str, pod_key: str) -> None:
    chain = chain_name(pod_key)
    listing = netns.run(node_ns, ["nft", "-a", "list", "chain", "ip", TABLE, "hostports"], check=False)
    if listing.returncode != 0:
        return
    script = []
    for line in listing.stdout.splitlines():
        if f"jump {chain} " in line + " " and "# handle" in line:
            handle = line.rsplit("# handle", 1)[1].strip()
            script.append(f"delete rule ip {TABLE} hostports handle {handle}")
    script.append(f"delete chain ip {TABLE} {chain}")
    netns.run(node_ns, ["nft", "-f", "-"], input="\n".join(script) + "\n", check=False)
