"""Pod addresses from the node's subnet, as CNI's host-local IPAM hands them out.

One file per address in the node's folder (named by the address, holding the
owner's id), created with O_EXCL: an address is never given twice, even by two
processes at once, survives a restart of the node agent, and is freed when its
pod goes. The bridge holds the first address; allocation goes upward from the
last one handed out, so a freed address is not reused at once (as host-local
does), which keeps stale conntrack entries from pointing at a new pod.
"""

from __future__ import annotations

import ipaddress
import os


class ExhaustedError(RuntimeError):
    pass


class HostLocalIPAM:
    def __init__(self, directory: str, subnet: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address):
        self.dir = directory
        self.subnet = subnet
        self.gateway = gateway
        os.makedirs(directory, exist_ok=True)

    def _candidates(self):
        hosts = [ip for ip in self.subnet.hosts() if ip != self.gateway]
        last = self._last()
        start = 0
        if last is not None and last in hosts:
            start = hosts.index(last) + 1
        return hosts[start:] + hosts[:start]

    def _last(self):
        try:
            with open(os.path.join(self.dir, "last_reserved_ip")) as f:
                return ipaddress.IPv4Address(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None

    def allocate(self, owner: str) -> ipaddress.IPv4Address:
        existing = self.find(owner)
        if existing is not None:
            return existing
        for ip in self._candidates():
            try:
                fd = os.open(os.path.join(self.dir, str(ip)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(owner)
            with open(os.path.join(self.dir, "last_reserved_ip"), "w") as f:
                f.write(str(ip))
            return ip
        raise ExhaustedError(f"no free address left in {self.subnet}")

    def find(self, owner: str) -> ipaddress.IPv4Address | None:
        for ip, who in self.allocations().items():
            if who == owner:
                return ip
        return None

    def release(self, owner: str) -> None:
        for ip, who in self.allocations().items():
            if who == owner:
                os.unlink(os.path.join(self.dir, str(ip)))

    def allocations(self) -> dict[ipaddress.IPv4Address, str]:
        out = {}
        for name in os.listdir(self.dir):
            try:
                ip = ipaddress.IPv4Address(name)
            except ValueError:
                continue
            try:
                with open(os.path.join(self.dir, name)) as f:
                    out[ip] = f.read().strip()
            except FileNotFoundError:
                continue
        return out
