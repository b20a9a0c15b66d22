"""The service proxy's appliers: keep a node's DNAT rules equal to the desired state.

Used by the per-node proxy daemon, which has already entered the node's network
namespace: everything here acts on the namespace of the calling thread (nft
contexts are bound at creation, child processes inherit the thread's namespace).

As kube-proxy's ServiceChangeTracker / EndpointsChangeTracker, a proxier keeps
the Services and Endpoints it was given and, per service, the service ports and
the rule fragment computed from them. A sync is told which services changed
(`sync_changes`), or given the full lists and finds the changed ones itself by
resourceVersion (`sync`); only the changed services are recomputed, and only
their rules are sent to the kernel, as one transaction (an nf_tables netlink
batch or an nft transaction, or one iptables-restore --noflush run). The first
sync, and any sync after a failed apply, installs everything (kube-proxy's
needFullSync). After the rules change, stale UDP conntrack entries of the
changed services are deleted over ctnetlink: one dump of the table, the
selected entries deleted in batches (netemu.proxy.conntrack). Rules always go
first; a caller that must not wait for the clean-up (the daemon) asks for the
stale flows instead and cleans them after, off the sync path.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from netemu.proxy import conntrack as ct
from netemu.proxy import iptables as ipt
from netemu.proxy import libnft, nftnl
from netemu.proxy import nftables as nft
from netemu.proxy.model import (
    MASQUERADE_MARK,
    ServicePort,
    StaleFlow,
    build_service_ports,
    stale_udp_flows,
)

log = logging.getLogger("netemu.proxy")

ServiceKey = tuple[str, str]          # (namespace, name), shared by a Service and its Endpoints


class ProxyError(RuntimeError):
    pass


@dataclasses.dataclass
class SyncResult:
    mode: str                   # "nftables" | "iptables"
    full: bool                  # the whole table/chains were (re)written
    applied: bool               # something was sent to the kernel
    seconds: float              # time for the whole sync, conntrack clean-up included if done
    transaction_bytes: int      # size of what was sent: netlink batch, nft text, iptables-restore input
    service_ports: int
    # UDP conntrack filters this change made necessary (model.stale_udp_flows);
    # cleaned here unless the caller asked to do it itself (clean_conntrack=False)
    stale_flows: list[StaleFlow] = dataclasses.field(default_factory=list)
    changed_services: int = 0   # services whose rules were recomputed
    rules_seconds: float = 0.0  # until the rules were in the kernel
    # of rules_seconds, the kernel's own: the sendmsg() of each netlink batch,
    # inside which the kernel applies and commits it (0 for what went as nft
    # text or through iptables-restore, whose kernel time is not separable)
    kernel_seconds: float = 0.0
    conntrack: "ConntrackResult | None" = None


@dataclasses.dataclass
class ConntrackResult:
    flows: int                  # filters asked for
    selected: int               # entries of the dump they matched
    deleted: int                # entries the kernel deleted
    seconds: float


def object_key(obj: Mapping[str, Any]) -> ServiceKey:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "default", meta["name"])


def _fingerprint(obj: Mapping[str, Any]) -> str:
    """What tells two versions of an object apart: its resourceVersion, as
    kube-proxy's informers do, or (objects built by hand, no resourceVersion)
    its whole content."""
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return f"rv:{rv}" if rv else repr(obj)


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
        self._services: dict[ServiceKey, Mapping[str, Any]] = {}
        self._endpoints: dict[ServiceKey, Mapping[str, Any]] = {}
        self._fp_services: dict[ServiceKey, str] = {}
        self._fp_endpoints: dict[ServiceKey, str] = {}
        self._ports: dict[ServiceKey, list[ServicePort]] = {}
        self._fragments: dict[ServiceKey, Any] = {}    # per service: the mode's rule fragment
        self._installed = False                         # the kernel holds what _fragments say
        self._kernel_seconds = 0.0                      # this sync's, so far (SyncResult.kernel_seconds)
        # Opened now, like the nft contexts: bound to the namespace we are in.
        # The daemon cleans from another thread than the one syncing: one
        # clean-up at a time on the socket.
        self._conntrack = ct.ConntrackNetlink()
        self._conntrack_lock = threading.Lock()

    # -- input -----------------------------------------------------------------
    def sync(self, services: Iterable[Mapping[str, Any]], endpoints: Iterable[Mapping[str, Any]],
             full: bool = False) -> SyncResult:
        """Make the kernel's rules match SERVICES + ENDPOINTS (API-shaped dicts, all of them).

        The changed services are found by comparing each object's
        resourceVersion (or content) with the previous sync's.
        """
        svc_changes: dict[ServiceKey, Mapping[str, Any] | None] = {}
        eps_changes: dict[ServiceKey, Mapping[str, Any] | None] = {}
        for objs, fps, changes in ((services, self._fp_services, svc_changes),
                                   (endpoints, self._fp_endpoints, eps_changes)):
            seen = set()
            for obj in objs:
                key = object_key(obj)
                seen.add(key)
                if fps.get(key) != _fingerprint(obj):
                    changes[key] = obj
            for key in fps.keys() - seen:
                changes[key] = None
        return self.sync_changes(svc_changes, eps_changes, full=full)

    def sync_changes(self, services: Mapping[ServiceKey, Mapping[str, Any] | None] | None = None,
                     endpoints: Mapping[ServiceKey, Mapping[str, Any] | None] | None = None,
                     full: bool = False, clean_conntrack: bool = True) -> SyncResult:
        """Apply changed objects: {(namespace, name): object, or None when deleted}.

        Objects are kept by reference: the caller must not modify one after
        handing it over (pass a new object instead, as a watch does).
        With CLEAN_CONNTRACK false, the stale UDP flows are only returned
        (result.stale_flows), for the caller to pass to clean_conntrack()
        after the rules are in: the next sync need not wait for them.
        """
        # A full sync allocates millions of small objects, almost all freed by
        # reference counting; with the cyclic collector on, its collections
        # (walking every object the proxier keeps) took a third of the Python
        # time of a 10,000-service full sync. None of our objects form cycles
        # that need it, so it waits until the sync is done.
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            result = self._sync_changes(services, endpoints, full)
        finally:
            if gc_enabled:
                gc.enable()
        if clean_conntrack and result.stale_flows:
            result.conntrack = self.clean_conntrack(result.stale_flows)
            result.seconds += result.conntrack.seconds
        return result

    def clean_conntrack(self, flows: Sequence[StaleFlow]) -> ConntrackResult:
        """Delete the UDP conntrack entries FLOWS select: one dump of the
        node's table and batched deletes, whatever the number of flows."""
        t0 = time.perf_counter()
        with self._conntrack_lock:
            selected, deleted = self._conntrack.clean(flows)
        return ConntrackResult(len(flows), selected, deleted, time.perf_counter() - t0)

    def _sync_changes(self, services, endpoints, full: bool) -> SyncResult:
        t0 = time.perf_counter()
        self._kernel_seconds = 0.0
        changed: set[ServiceKey] = set()
        for changes, store, fps in ((services or {}, self._services, self._fp_services),
                                    (endpoints or {}, self._endpoints, self._fp_endpoints)):
            for key, obj in changes.items():
                if obj is None:
                    store.pop(key, None)
                    fps.pop(key, None)
                else:
                    store[key] = obj
                    fps[key] = _fingerprint(obj)
                changed.add(key)

        old_ports = {k: self._ports.get(k, []) for k in changed}
        old_fragments = {k: self._fragments.get(k) for k in changed}
        was_full = full or not self._installed
        try:
            for key in changed:
                svc = self._services.get(key)
                eps = [self._endpoints[key]] if key in self._endpoints else []
                ports = build_service_ports([svc], eps) if svc is not None else []
                if ports:
                    self._ports[key] = ports
                    self._fragments[key] = self._fragment(ports)
                else:
                    self._ports.pop(key, None)
                    self._fragments.pop(key, None)
            size = self._apply_full() if was_full else self._apply_changes(
                {k: v for k, v in old_fragments.items() if v is not None},
                {k: self._fragments[k] for k in changed if k in self._fragments})
        except Exception:
            # Unknown kernel state: the next sync rewrites everything (a service
            # whose rules could not be computed keeps its previous fragment).
            self._installed = False
            raise
        self._installed = True
        rules_seconds = time.perf_counter() - t0

        # Computed only now that the rules no longer send new flows to the
        # removed endpoints: an entry deleted earlier could come straight back.
        flows = stale_udp_flows([sp for k in changed for sp in old_ports[k]],
                                [sp for k in changed for sp in self._ports.get(k, ())])
        return SyncResult(self.mode, was_full, size > 0, time.perf_counter() - t0, size,
                          sum(len(p) for p in self._ports.values()), flows, len(changed),
                          rules_seconds, self._kernel_seconds)

    # -- per mode ----------------------------------------------------------------
    def _fragment(self, ports: list[ServicePort]):
        raise NotImplementedError

    def _apply_full(self) -> int:
        raise NotImplementedError

    def _apply_changes(self, old: dict, new: dict) -> int:
        raise NotImplementedError

    def _forget(self) -> None:
        """After a clean-up: nothing installed, nothing known."""
        for d in (self._services, self._endpoints, self._fp_services, self._fp_endpoints,
                  self._ports, self._fragments):
            d.clear()
        self._installed = False

    def cleanup(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._conntrack.close()


class NftablesProxier(_Proxier):
    """kube-proxy's nftables mode: table `ip kube-proxy`, incremental transactions.

    Two ways to the kernel, same table (netemu.proxy.nftnl):
    - netlink (the default): the per-service part as nf_tables messages that
      nftnl encodes, one NFNL batch per sync; nft (libnftables) only writes
      the fixed skeleton, and removes the table.
    - text: the whole transaction as nft text (nftables.full_transaction /
      incremental_transaction), through libnftables or `nft -f`. Used when
      the netlink socket cannot be opened, when a rule has a shape nftnl does
      not encode, and for a batch the kernel refused (retried as text, and
      the netlink path is left for good if the text is accepted: the fault
      was ours). Each fallback is logged.

    What is atomic: a change (sync of changed services) is one transaction
    either way. A full sync replacing an existing table (the daemon restarted,
    or the previous sync failed) is one text transaction, as before: packets
    see the old table or the new one. A full sync on a node without the table
    is two transactions: the skeleton (empty maps: no service answers yet),
    then every service in one batch; so a packet sees no services, then all
    of them, and never part of one.
    """

    mode = "nftables"

    def __init__(self, node_name: str, node_ips: Sequence[str], cluster_cidr: str,
                 masquerade_mark: int = MASQUERADE_MARK, prefer_library: bool = True,
                 netlink: bool = True) -> None:
        super().__init__(node_name, node_ips, cluster_cidr, masquerade_mark)
        # Opened now: from here on they act on the namespace we are in at this moment.
        self.nft = libnft.open_nft(prefer_library)
        self.netlink: nftnl.NftNetlink | None = None
        if netlink:
            try:
                self.netlink = nftnl.NftNetlink()
            except OSError as e:
                log.warning("nf_tables netlink socket unavailable (%s); writing rules as nft text", e)

    def _fragment(self, ports):
        return nft.service_port_state(ports, self.node_name, self.cluster_cidr)

    def _run(self, text: str) -> int:
        if text:
            try:
                self.nft.run(text)
            except libnft.NftError as e:
                raise ProxyError(f"nft transaction failed: {e}") from e
        return len(text)

    def _send(self, diff: nft.NftDiff) -> tuple[int | None, bool]:
        """DIFF as one netlink batch: (bytes sent, or None when it must go as
        text instead; whether the kernel refused the batch)."""
        if self.netlink is None:
            return None, False
        try:
            batch = nftnl.diff_batch(diff)
        except nftnl.Unsupported as e:
            log.warning("rule not encodable as netlink (%s); this sync goes as nft text", e)
            return None, False
        try:
            sent = self.netlink.send(batch)
            self._kernel_seconds += self.netlink.last_send_seconds
            return sent, False
        except (nftnl.NetlinkError, OSError) as e:
            log.warning("netlink batch failed (%s); retrying as nft text", e)
            return None, True

    def _text_fallback(self, text: str, refused: bool) -> int:
        size = self._run(text)
        if refused and self.netlink is not None:
            # The kernel took the text but not our batch: our encoding is at
            # fault. Stop using it rather than failing every sync twice.
            log.warning("nft accepted what the netlink batch could not apply; "
                        "writing rules as nft text from now on")
            self.netlink.close()
            self.netlink = None
        return size

    def _apply_full(self) -> int:
        state = nft.merge_states(self._fragments[k] for k in sorted(self._fragments))
        refused = False
        if self.netlink is not None:
            try:
                fresh = not self.netlink.table_exists()
            except (nftnl.NetlinkError, OSError) as e:
                log.warning("netlink table lookup failed (%s); full sync as nft text", e)
                fresh = False
            if fresh:
                diff = nft.full_diff(state)
                size = self._run("\n".join(nft.skeleton_commands(self.mark)) + "\n")
                sent, refused = self._send(diff)
                if sent is not None:
                    return size + sent
        # Replaces whatever table is there (the skeleton just written too).
        return self._text_fallback(nft.full_transaction(state, self.mark), refused)

    def _apply_changes(self, old, new) -> int:
        # Fragments never share a name or a map key, so the diff of the changed
        # services' fragments alone is the diff of the whole table.
        old_st, new_st = nft.merge_states(old.values()), nft.merge_states(new.values())
        diff = nft.state_diff(old_st, new_st)
        if not diff:
            return 0
        sent, refused = self._send(diff)
        if sent is not None:
            return sent
        return self._text_fallback(nft.incremental_transaction(old_st, new_st), refused)

    def cleanup(self) -> None:
        self.nft.run(nft.cleanup_transaction())
        self._forget()

    def close(self) -> None:
        super().close()
        self.nft.close()
        if self.netlink is not None:
            self.netlink.close()


class IptablesProxier(_Proxier):
    """kube-proxy's iptables mode through the default `iptables-restore`.

    On this machine `iptables` is iptables-nft (v1.8.9, nf_tables): the rules
    land in nftables tables `ip nat` / `ip filter` and can be read with either
    `iptables-save` or `nft list ruleset`.
    """

    mode = "iptables"
    _last: ipt.IptablesState | None = None    # what the last restore installed
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

    def _fragment(self, ports):
        return ipt.service_port_rules(ports, self.node_name, self.cluster_cidr)

    def _state(self) -> ipt.IptablesState:
        # The top-level chains (KUBE-SERVICES, KUBE-NODEPORTS, filter) list every
        # service in kube-proxy's order and are rewritten on each sync.
        return ipt.assemble((self._fragments[k] for k in sorted(self._fragments)), self.mark)

    def _apply_full(self) -> int:
        state = self._state()
        text = ipt.restore_input(state, None, self._save())
        self._restore(text)
        self._last = state
        return len(text)

    def _apply_changes(self, old, new) -> int:
        state = self._state()
        text = ipt.restore_input(state, self._last)
        if text == ipt.EMPTY_RESTORE:
            return 0
        self._restore(text)
        self._last = state
        return len(text)

    def cleanup(self) -> None:
        self._restore(ipt.cleanup_input(self._save()))
        self._forget()


def make_proxier(mode: str, node_name: str, node_ips: Sequence[str], cluster_cidr: str,
                 **kw) -> NftablesProxier | IptablesProxier:
    """The proxier for MODE ("nftables", the default in netemu, or "iptables")."""
    if mode == "nftables":
        return NftablesProxier(node_name, node_ips, cluster_cidr, **kw)
    if mode == "iptables":
        return IptablesProxier(node_name, node_ips, cluster_cidr, **kw)
    raise ValueError(f"unknown proxy mode {mode!r} (nftables or iptables)")
