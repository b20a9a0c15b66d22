"""The service proxy's appliers: keep a node's DNAT rules equal to the desired state.

Used by the per-node proxy daemon, which has already entered the node's network
namespace: everything here acts on the namespace of the calling thread (nft
contexts are bound at creation, child processes inherit the thread's namespace).

Each proxier remembers what it last applied. The first sync installs
everything in one transaction; later syncs compute the new desired state, diff
it against the remembered one, and apply only the difference, again as one
transaction (an nft transaction, or one iptables-restore --noflush run). A
failed apply forgets the remembered state, so the next sync is a full one, as
kube-proxy's needFullSync. After the rules change, stale UDP conntrack entries
are deleted with the `conntrack` tool (see model.conntrack_cleanup).
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from netemu.proxy import iptables as ipt
from netemu.proxy import libnft
from netemu.proxy import nftables as nft
from netemu.proxy.model import MASQUERADE_MARK, ServicePort, build_service_ports, conntrack_cleanup


class ProxyError(RuntimeError):
    pass


@dataclasses.dataclass
class SyncResult:
    mode: str                   # "nftables" | "iptables"
    full: bool                  # the whole table/chains were (re)written
    applied: bool               # something was sent to the kernel
    seconds: float              # time for the whole sync, conntrack included
    transaction_bytes: int      # size of the nft / iptables-restore input
    service_ports: int
    conntrack_commands: list[list[str]] = dataclasses.field(default_factory=list)


class _Proxier:
    mode = ""

    def __init__(self, node_name: str, node_ips: Sequence[str], cluster_cidr: str,
                 masquerade_mark: int = MASQUERADE_MARK) -> None:
        self.node_name = node_name
        # NodePorts are served on every local address (fib daddr type local /
        # addrtype LOCAL), kube-proxy's default; the node IPs are kept for the
        # record and for a future --nodeport-addresses.
        self.node_ips = tuple(node_ips)
        self.cluster_cidr = cluster_cidr
        self.mark = masquerade_mark
        self._ports: list[ServicePort] = []
        self._state = None

    def sync(self, services: Iterable[Mapping[str, Any]], endpoints: Iterable[Mapping[str, Any]],
             full: bool = False) -> SyncResult:
        """Make the kernel's rules match SERVICES + ENDPOINTS (API-shaped dicts)."""
        t0 = time.perf_counter()
        ports = build_service_ports(services, endpoints)
        if full:
            self._state = None
        was_full = self._state is None
        try:
            new_state, size = self._apply(ports)
        except Exception:
            self._state = None   # unknown kernel state: next sync rewrites everything
            raise
        self._state = new_state
        cmds = conntrack_cleanup(self._ports, ports)
        for argv in cmds:
            # Exit status 1 means "0 entries deleted": not an error.
            subprocess.run(argv, capture_output=True)
        self._ports = ports
        return SyncResult(self.mode, was_full, size > 0, time.perf_counter() - t0, size,
                          len(ports), cmds)

    def _apply(self, ports: list[ServicePort]):
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError


class NftablesProxier(_Proxier):
    """kube-proxy's nftables mode: table `ip kube-proxy`, incremental transactions."""

    mode = "nftables"

    def __init__(self, node_name: str, node_ips: Sequence[str], cluster_cidr: str,
                 masquerade_mark: int = MASQUERADE_MARK, prefer_library: bool = True) -> None:
        super().__init__(node_name, node_ips, cluster_cidr, masquerade_mark)
        # Opened now: from here on it acts on the namespace we are in at this moment.
        self.nft = libnft.open_nft(prefer_library)

    def _apply(self, ports):
        new = nft.desired_state(ports, self.node_name, self.cluster_cidr)
        if self._state is None:
            text = nft.full_transaction(new, self.mark)
        else:
            text = nft.incremental_transaction(self._state, new)
        if text:
            try:
                self.nft.run(text)
            except libnft.NftError as e:
                raise ProxyError(f"nft transaction failed: {e}") from e
        return new, len(text)

    def cleanup(self) -> None:
        self.nft.run(nft.cleanup_transaction())
        self._state, self._ports = None, []

    def close(self) -> None:
        self.nft.close()


class IptablesProxier(_Proxier):
    """kube-proxy's iptables mode through the default `iptables-restore`.

    On this machine `iptables` is iptables-nft (v1.8.9, nf_tables): the rules
    land in nftables tables `ip nat` / `ip filter` and can be read with either
    `iptables-save` or `nft list ruleset`.
    """

    mode = "iptables"
    RESTORE = ("iptables-restore", "-w", "--noflush")
    SAVE = ("iptables-save",)

    def _save(self) -> str:
        out = []
        for table in ("filter", "nat"):
            proc = subprocess.run([*self.SAVE, "-t", table], capture_output=True, text=True)
            if proc.returncode != 0:
                raise ProxyError(f"iptables-save -t {table}: {proc.stderr.strip()}")
            out.append(proc.stdout)
        return "".join(out)

    def _restore(self, text: str) -> None:
        proc = subprocess.run(self.RESTORE, input=text, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ProxyError(f"iptables-restore: {proc.stderr.strip()}")

    def _apply(self, ports):
        new = ipt.desired_state(ports, self.node_name, self.cluster_cidr, self.mark)
        if self._state is None:
            text = ipt.restore_input(new, None, self._save())
        else:
            text = ipt.restore_input(new, self._state)
        self._restore(text)
        return new, len(text)

    def cleanup(self) -> None:
        self._restore(ipt.cleanup_input(self._save()))
        self._state, self._ports = None, []

    def close(self) -> None:
        pass


def make_proxier(mode: str, node_name: str, node_ips: Sequence[str], cluster_cidr: str,
                 **kw) -> NftablesProxier | IptablesProxier:
    """The proxier for MODE ("nftables", the default in netemu, or "iptables")."""
    if mode == "nftables":
        return NftablesProxier(node_name, node_ips, cluster_cidr, **kw)
    if mode == "iptables":
        return IptablesProxier(node_name, node_ips, cluster_cidr, **kw)
    raise ValueError(f"unknown proxy mode {mode!r} (nftables or iptables)")
