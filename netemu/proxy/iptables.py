"""kube-proxy's iptables mode as pure rule generation: iptables-restore input.

Like pkg/proxy/iptables/proxier.go, the rules are written as one
`iptables-restore --noflush` input covering the filter and nat tables:
- the top-level chains (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING,
  KUBE-MARK-MASQ in nat; KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-FORWARD,
  KUBE-NODEPORTS, KUBE-PROXY-FIREWALL in filter) are declared, which flushes
  them under --noflush, and refilled completely, on a full sync and on later
  syncs only when their rules changed (kube-proxy refills them every time;
  the resulting rules are the same, it just costs more at 10,000 services);
- a per-service chain (KUBE-SVC-*, KUBE-SVL-*, KUBE-EXT-*, KUBE-SEP-*) is
  written only when it is new or its rules changed (kube-proxy's "partial
  sync"); unchanged ones are not mentioned and stay as they are;
- chains no longer used are declared (flushed) and deleted with -X;
- the jump rules from the built-in chains (PREROUTING, OUTPUT, POSTROUTING,
  INPUT, FORWARD) are inserted only where `iptables-save` shows them missing,
  so installing is idempotent.

Comments and number formats are kube-proxy's: "ns/name:port cluster IP",
"ns/name:port -> ip:port", `--probability 0.5000000000` (Go's %0.10f; iptables-save
prints it back with 11 digits, 0.50000000000). The large-cluster mode that drops
comments above 1000 endpoints is not reproduced: comments are always written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from netemu.proxy.model import (IPT_EXT_PREFIX, IPT_FW_PREFIX, IPT_SEP_PREFIX, IPT_SVC_PREFIX,
                                IPT_SVL_PREFIX, MASQUERADE_MARK, Endpoint, ServicePort,
                                mark_string)

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"

FILTER_TOP_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS,
                     KUBE_PROXY_FIREWALL)
NAT_TOP_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
SERVICE_CHAIN_PREFIXES = (IPT_SVC_PREFIX, IPT_SVL_PREFIX, IPT_EXT_PREFIX, IPT_FW_PREFIX,
                          IPT_SEP_PREFIX)

# iptablesJumpChains: (table, our chain, built-in chain, comment, extra args)
NEW = ("-m", "conntrack", "--ctstate", "NEW")
JUMP_CHAINS = (
    ("filter", KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals", NEW),
    ("filter", KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals", NEW),
    ("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports", ()),
    ("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", NEW),
    ("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", NEW),
    ("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules", ()),
    ("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", NEW),
    ("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", NEW),
    ("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", NEW),
    ("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", ()),
    ("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals", ()),
    ("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules", ()),
)


def compute_probability(n: int) -> str:
    """kube-proxy's computeProbability: Go's %0.10f of 1/n."""
    return f"{1.0 / n:0.10f}"


def _q(text: str) -> str:
    """Quote a comment that has spaces, as kube-proxy does (iptables-save style)."""
    return f'"{text}"' if " " in text else text


def jump_args(comment: str, extra: Sequence[str], dst: str) -> str:
    return " ".join((*extra, "-m", "comment", "--comment", _q(comment), "-j", dst))


@dataclasses.dataclass
class IptablesState:
    """Desired rules. Top-level chains are rewritten every sync; service chains by diff."""

    filter_rules: list[str] = dataclasses.field(default_factory=list)
    nat_rules: list[str] = dataclasses.field(default_factory=list)
    nat_chains: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class IptablesFragment:
    """The rules that belong to some service ports (one service's), before assembly."""

    filter_rules: list[str] = dataclasses.field(default_factory=list)
    nat_rules: list[str] = dataclasses.field(default_factory=list)       # KUBE-SERVICES
    nodeport_rules: list[str] = dataclasses.field(default_factory=list)  # KUBE-NODEPORTS
    nat_chains: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def service_port_rules(service_ports: Iterable[ServicePort], node_name: str,
                       cluster_cidr: str) -> IptablesFragment:
    """The fragment for these service ports; a proxier keeps one per service."""
    frag = IptablesFragment()
    for sp in service_ports:
        _add_service_port(frag, frag.nodeport_rules, sp, node_name, cluster_cidr)
    return frag


def assemble(fragments: Iterable[IptablesFragment], mark: int = MASQUERADE_MARK) -> IptablesState:
    """The whole desired state from the fragments, in the order given (kube-proxy's)."""
    m = mark_string(mark)
    st = IptablesState()
    st.nat_rules += [
        f"-A {KUBE_POSTROUTING} -m mark ! --mark {m}/{m} -j RETURN",
        # Clear the mark so a packet that traverses the stack again is not re-masqueraded.
        f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {m}",
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" '
        f"-j MASQUERADE --random-fully",
        f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {m}",
    ]
    nodeport_rules: list[str] = []
    for frag in fragments:
        st.filter_rules += frag.filter_rules
        st.nat_rules += frag.nat_rules
        nodeport_rules += frag.nodeport_rules
        st.nat_chains.update(frag.nat_chains)
    st.nat_rules += nodeport_rules
    st.nat_rules.append(
        f'-A {KUBE_SERVICES} -m comment --comment "kubernetes service nodeports; NOTE: this must '
        f'be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j {KUBE_NODEPORTS}')
    st.filter_rules += [
        f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP",
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {m}/{m} -j ACCEPT',
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        f"-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    return st


def desired_state(service_ports: Iterable[ServicePort], node_name: str, cluster_cidr: str,
                  mark: int = MASQUERADE_MARK) -> IptablesState:
    """What kube-proxy's syncProxyRules would write for these service ports."""
    return assemble([service_port_rules(service_ports, node_name, cluster_cidr)], mark)


def _add_service_port(st: IptablesFragment, nodeport_rules: list[str], sp: ServicePort,
                      node_name: str, cluster_cidr: str) -> None:
    proto, name = sp.proto, sp.name_string
    cluster_eps = sp.ready_endpoints
    local_eps = sp.local_endpoints(node_name)
    has_endpoints = bool(cluster_eps)
    ext_local = sp.external_policy_local
    has_external_eps = sp.has_external_endpoints(node_name)
    svc_chain, svl_chain, ext_chain = sp.ipt_svc_chain, sp.ipt_svl_chain, sp.ipt_ext_chain
    ext_policy_chain = svl_chain if ext_local else svc_chain
    match = f"-m {proto} -p {proto}"

    if not has_endpoints:
        ext_target, ext_comment = "REJECT", f'"{name} has no endpoints"'
    else:
        ext_target, ext_comment = "DROP", f'"{name} has no local endpoints"'

    if has_endpoints:
        st.nat_rules.append(f'-A {KUBE_SERVICES} -m comment --comment "{name} cluster IP" '
                            f"{match} -d {sp.cluster_ip} --dport {sp.port} -j {svc_chain}")
    else:
        st.filter_rules.append(f"-A {KUBE_SERVICES} -m comment --comment {ext_comment} "
                               f"{match} -d {sp.cluster_ip} --dport {sp.port} -j REJECT")
    for kind, ips in (("external IP", sp.external_ips), ("loadbalancer IP", sp.load_balancer_ips)):
        for ip in ips:
            if has_endpoints:
                st.nat_rules.append(f'-A {KUBE_SERVICES} -m comment --comment "{name} {kind}" '
                                    f"{match} -d {ip} --dport {sp.port} -j {ext_chain}")
            if not has_external_eps:
                st.filter_rules.append(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} "
                                       f"{match} -d {ip} --dport {sp.port} -j {ext_target}")
    if sp.node_port:
        if has_endpoints:
            nodeport_rules.append(f"-A {KUBE_NODEPORTS} -m comment --comment {_q(name)} "
                                  f"{match} --dport {sp.node_port} -j {ext_chain}")
        if not has_external_eps:
            st.filter_rules.append(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} "
                                   f"-m addrtype --dst-type LOCAL {match} --dport {sp.node_port} "
                                   f"-j {ext_target}")

    if not has_endpoints:
        return

    # Off-cluster sources reaching the cluster IP through this node: masquerade.
    st.nat_chains[svc_chain] = (
        f'-A {svc_chain} -m comment --comment "{name} cluster IP" {match} -d {sp.cluster_ip} '
        f"--dport {sp.port} ! -s {cluster_cidr} -j {KUBE_MARK_MASQ}",
        *_to_endpoints_rules(sp, svc_chain, cluster_eps))

    if sp.externally_accessible:
        if not ext_local:
            rules = [f'-A {ext_chain} -m comment --comment "masquerade traffic for {name} external '
                     f'destinations" -j {KUBE_MARK_MASQ}']
        else:
            rules = [
                f'-A {ext_chain} -m comment --comment "pod traffic for {name} external destinations" '
                f"-s {cluster_cidr} -j {svc_chain}",
                f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {name} external '
                f'destinations" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}',
                f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {name} external '
                f'destinations" -m addrtype --src-type LOCAL -j {svc_chain}',
            ]
        if has_external_eps:
            rules.append(f"-A {ext_chain} -j {ext_policy_chain}")
        st.nat_chains[ext_chain] = tuple(rules)

    if ext_local and local_eps:
        st.nat_chains[svl_chain] = tuple(_to_endpoints_rules(sp, svl_chain, local_eps))

    for ep in cluster_eps:
        sep = sp.ipt_sep_chain(ep)
        head = f"-A {sep} -m comment --comment {_q(name)}"
        affinity = f" -m recent --name {sep} --set" if sp.affinity_timeout is not None else ""
        st.nat_chains[sep] = (
            f"{head} -s {ep.ip} -j {KUBE_MARK_MASQ}",       # hairpin: pod -> own service
            f"{head}{affinity} {match} -j DNAT --to-destination {ep.address}",
        )


def _to_endpoints_rules(sp: ServicePort, chain: str, eps: Sequence[Endpoint]) -> list[str]:
    """writeServiceToEndpointRules: affinity checks, then 1/(n-i) random picks."""
    rules = []
    if sp.affinity_timeout is not None:
        for ep in eps:
            sep = sp.ipt_sep_chain(ep)
            rules.append(f'-A {chain} -m comment --comment "{sp.name_string} -> {ep.address}" '
                         f"-m recent --name {sep} --rcheck --seconds {sp.affinity_timeout} --reap -j {sep}")
    n = len(eps)
    for i, ep in enumerate(eps):
        stat = (f" -m statistic --mode random --probability {compute_probability(n - i)}"
                if i < n - 1 else "")
        rules.append(f'-A {chain} -m comment --comment "{sp.name_string} -> {ep.address}"{stat} '
                     f"-j {sp.ipt_sep_chain(ep)}")
    return rules


# -- iptables-save parsing ------------------------------------------------------

def saved_chains(saved: str, table: str) -> set[str]:
    """Chain names declared in TABLE's section of iptables-save output."""
    chains, current = set(), None
    for line in saved.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
        elif current == table and line.startswith(":"):
            chains.add(line[1:].split()[0])
    return chains


def saved_rules(saved: str, table: str) -> set[str]:
    rules, current = set(), None
    for line in saved.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
        elif current == table and line.startswith("-A "):
            rules.add(line.strip())
    return rules


def is_service_chain(chain: str) -> bool:
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


def missing_jumps(saved: str | None) -> list[tuple[str, str]]:
    """(table, "-I CHAIN args") for each jump rule absent from iptables-save output."""
    out = []
    for table, dst, src, comment, extra in JUMP_CHAINS:
        args = jump_args(comment, extra, dst)
        if saved is None or f"-A {src} {args}" not in saved_rules(saved, table):
            out.append((table, f"-I {src} {args}"))
    return out


# -- rendering -------------------------------------------------------------------

EMPTY_RESTORE = "*filter\nCOMMIT\n*nat\nCOMMIT\n"   # restore_input when nothing changed


def restore_input(new: IptablesState, old: IptablesState | None = None,
                  saved: str | None = None) -> str:
    """iptables-restore --noflush input turning OLD (None: unknown) into NEW.

    With OLD None every service chain is written, and SAVED (iptables-save
    output of nat+filter, if given) tells which jump rules are missing and which
    leftover service chains to delete.
    """
    if old is None:
        write = sorted(new.nat_chains)
        stale = sorted(c for c in saved_chains(saved or "", "nat")
                       if is_service_chain(c) and c not in new.nat_chains)
        jumps = missing_jumps(saved)
    else:
        write = sorted(c for c, rules in new.nat_chains.items() if old.nat_chains.get(c) != rules)
        stale = sorted(c for c in old.nat_chains if c not in new.nat_chains)
        jumps = []

    # Top-level chains: all of them on a full sync; afterwards only those whose
    # rules changed. kube-proxy rewrites them on every sync, which at 10,000
    # services is 10,000+ rules re-sent for an endpoint change that leaves
    # KUBE-SERVICES as it was; the installed rules are the same either way.
    filter_new, nat_new = _rules_by_chain(new.filter_rules), _rules_by_chain(new.nat_rules)
    if old is None:
        filter_top, nat_top = FILTER_TOP_CHAINS, NAT_TOP_CHAINS
    else:
        filter_old, nat_old = _rules_by_chain(old.filter_rules), _rules_by_chain(old.nat_rules)
        filter_top = [c for c in FILTER_TOP_CHAINS if filter_new.get(c) != filter_old.get(c)]
        nat_top = [c for c in NAT_TOP_CHAINS if nat_new.get(c) != nat_old.get(c)]

    lines = ["*filter"]
    lines += [f":{c} - [0:0]" for c in filter_top]
    lines += [j for t, j in jumps if t == "filter"]
    for c in filter_top:
        lines += filter_new.get(c, ())
    lines.append("COMMIT")
    lines.append("*nat")
    lines += [f":{c} - [0:0]" for c in (*nat_top, *write, *stale)]
    lines += [j for t, j in jumps if t == "nat"]
    for c in nat_top:
        lines += nat_new.get(c, ())
    for c in write:
        lines += new.nat_chains[c]
    lines += [f"-X {c}" for c in stale]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _rules_by_chain(rules: Sequence[str]) -> dict[str, list[str]]:
    """"-A CHAIN ..." lines grouped by chain, in order."""
    out: dict[str, list[str]] = {}
    for rule in rules:
        out.setdefault(rule.split(" ", 2)[1], []).append(rule)
    return out


def cleanup_input(saved: str) -> str:
    """iptables-restore --noflush input removing everything ours found in SAVED."""
    lines: list[str] = []
    for table, tops in (("filter", FILTER_TOP_CHAINS), ("nat", NAT_TOP_CHAINS)):
        existing = saved_chains(saved, table)
        rules = saved_rules(saved, table)
        ours = [c for c in tops if c in existing]
        ours += sorted(c for c in existing if is_service_chain(c))
        lines.append(f"*{table}")
        lines += [f":{c} - [0:0]" for c in ours]
        for t, dst, src, comment, extra in JUMP_CHAINS:
            rule = f"-A {src} {jump_args(comment, extra, dst)}"
            if t == table and rule in rules:
                lines.append("-D" + rule[2:])
        lines += [f"-X {c}" for c in ours]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"

