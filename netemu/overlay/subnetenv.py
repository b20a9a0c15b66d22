"""flannel's subnet.env: the contract between the overlay daemon and the container
runtime. Docker takes --bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU from it; our node
agent does the same for docker0 and every pod's eth0.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os


@dataclasses.dataclass(frozen=True)
class SubnetEnv:
    network: ipaddress.IPv4Network          # FLANNEL_NETWORK
    subnet: ipaddress.IPv4Interface         # FLANNEL_SUBNET: first usable address / subnet prefix
    mtu: int                                # FLANNEL_MTU
    ipmasq: bool                            # FLANNEL_IPMASQ

    def render(self) -> str:
        return (f"FLANNEL_NETWORK={self.network}\n"
                f"FLANNEL_SUBNET={self.subnet.with_prefixlen}\n"
                f"FLANNEL_MTU={self.mtu}\n"
                f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n")

    @classmethod
    def parse(cls, text: str) -> "SubnetEnv":
        values = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                values[k.strip()] = v.strip()
        try:
            return cls(network=ipaddress.IPv4Network(values["FLANNEL_NETWORK"]),
                       subnet=ipaddress.IPv4Interface(values["FLANNEL_SUBNET"]),
                       mtu=int(values["FLANNEL_MTU"]),
                       ipmasq=values.get("FLANNEL_IPMASQ", "false") == "true")
        except (KeyError, ValueError) as e:
            raise ValueError(f"malformed subnet.env: {e}") from None

    @classmethod
    def for_lease(cls, network, subnet: ipaddress.IPv4Network, mtu: int, ipmasq: bool = False):
        first = ipaddress.IPv4Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")
        return cls(network=network, subnet=first, mtu=mtu, ipmasq=ipmasq)


def path(node_dir: str) -> str:
    return os.path.join(node_dir, "subnet.env")


def read(node_dir: str) -> SubnetEnv | None:
    try:
        with open(path(node_dir)) as f:
            return SubnetEnv.parse(f.read())
    except FileNotFoundError:
        return None


def write(node_dir: str, env: SubnetEnv) -> None:
    tmp = path(node_dir) + ".tmp"
    with open(tmp, "w") as f:
        f.write(env.render())
    os.replace(tmp, path(node_dir))
