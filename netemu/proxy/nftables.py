"""kube-proxy's nftables mode as pure rule generation: desired state and diffs.

The table `ip kube-proxy` has a fixed skeleton (base chains hooked at dstnat /
srcnat, the `services` dispatch chain, masquerading helpers, the verdict maps)
and a per-service part: map elements, service/external/endpoint chains and
affinity sets. `desired_state()` computes the per-service part from service
ports (netemu.proxy.model); `full_transaction()` renders the whole table as one
nft transaction, and `incremental_transaction()` renders only what differs
between two desired states, also as one transaction. Applying it is
netemu.proxy.proxier's job. The per-service part is computed service port by
service port (`service_port_state()`), so that a proxier can keep one fragment
per service and recompute only the services that changed; `merge_states()`
joins fragments, and a diff of the fragments of the changed services alone is a
valid transaction for the whole table (names and map keys are per service).

Names, rule shapes and comments follow pkg/proxy/nftables/proxier.go:
    ip daddr . meta l4proto . th dport vmap @service-ips
    service-HASH-ns/name/tcp/port:  [masquerade off-cluster sources]
                                    numgen random mod 2 0 goto endpoint-...   (see below)
                                    goto endpoint-...
    endpoint-HASH-ns/name/tcp/port__ip/port:
                                    ip saddr <ip> jump mark-for-masquerade   (hairpin)
                                    meta l4proto tcp dnat to ip:port
Where we differ, on purpose, for speed: kube-proxy spreads over N endpoints
with one rule `numgen random mod N vmap { 0 : goto endpoint-A , 1 : goto
endpoint-B , ... }`; we write kube-proxy's iptables-mode cascade in nftables
terms instead: rule i of n is `numgen random mod (n-i) 0 goto endpoint-i`
(probability 1/(n-i) of the packets that reach it: uniform overall), the last
one a plain `goto`. Same chains, same names, same uniform choice; the
difference is N rules instead of one rule with an anonymous map. Why: each
anonymous map is a set in the kernel, and kernel 6.18 loads them in time
quadratic in their number, whoever sends them: the kernel finds a set by name
in a list of all the table's sets (nf_tables_newset's check, and the
lookups of NEWSETELEM and of the rule's lookup expression), and binding a new
set walks the transaction (__nft_set_trans_bind). The same full load sent as
one netlink batch, kernel time only (tools/bench_nft_vmap.py, 2 rounds):
1,000 services 95 ms vmap vs 39 ms cascade, 2,500 475 vs 100, 5,000 1.80 s vs
0.22 s, 10,000 9.07 s vs 0.44 s (20.6x); a one-rule change after it 37 vs
26 ms. (Through nft 1.0.6 text: ~40 s vs ~4 s, and every later transaction
lists every set of the table first.)
The per-service chains of a full load are written as one `table { chain { } }`
block, which nft parses faster than one `add rule` command per rule.

Two renderings of the same changes (`state_diff()` orders them): nft text
(`full_transaction()`, `incremental_transaction()`), and raw nf_tables
netlink messages (netemu.proxy.nftnl, the proxier's default), which skip
nft's parsing and the listing of every chain that nft 1.0.6 does before an
`add rule` / `add element` / `delete chain`. tests/integration/test_nftnl.py
checks that both give the same `nft list table` output.

What a sync costs at 10,000 services x 2 endpoints (tools/bench_proxy.py,
which reports the kernel's own time beside ours: the sendmsg() of the batch,
inside which the kernel applies and commits it; kernel 6.18, 2 shared vCPUs,
3 rounds, medians, chain-name caches cleared before each full sync; through
nft text: full 3.7-4.5 s, one change 130-150 ms):
- full sync 1.60 s, 3.37x the kernel's 0.47 s (one batch of ~100,000
  messages, 26 MB: for each expression a look-up of its type by name in a
  list (__nft_expr_type_get), chain look-ups by name, allocations, the
  commit). The rest is Python, timed phase by phase (cold chain-name
  caches): service ports 0.14 s, desired state 0.35 s, merge and diff
  0.04 s, rule encoding 0.38 s, the batch's bytes 0.02 s, bookkeeping the
  rest. The bench's CPython floor (read each service's
  fields, name its three chains, pack 100,000 message headers around fixed
  bytes, join; no rule encoded) is 0.37 s alone: 1.78x with the kernel's
  time, so a full sync within 1.3x of the kernel needs the whole way from
  API objects to the batch in native code.
- one change ~21 ms, 1.07x the kernel's ~20 ms, mostly nft_chain_validate:
  any transaction that adds a jump/goto/dnat makes the
  kernel re-validate the whole table at commit (nft_table_validate walks
  every chain reachable from each base chain, through every @service-ips
  element; nat-prerouting and nat-output both reach the whole service tree).
  It grows with the number of chains, so the one-change cost is not flat;
  one transaction per sync (not chunks) keeps it to one validation. Python
  is ~1.5 ms of it.

Other differences: no LoadBalancerSourceRanges (firewall-* chains), no
nodeport-ips set (NodePorts answer on every local address, kube-proxy's
default), priorities written as numbers (nft 1.0.6 accepts the `dstnat`
keyword only on the prerouting hook), and stale chains are deleted in the same
transaction that drops their last reference (safe on kernels >= 6.2; kube-proxy
waits a second for older kernels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from netemu.proxy.model import MASQUERADE_MARK, ServicePort, mark_string

FAMILY = "ip"
TABLE = "kube-proxy"
T = f"{FAMILY} {TABLE}"

SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
MAPS = (NO_ENDPOINT_SERVICES, NO_ENDPOINT_NODEPORTS, SERVICE_IPS, SERVICE_NODEPORTS)
REJECT_CHAIN = "reject-chain"
MARK_MASQ_CHAIN = "mark-for-masquerade"
MASQUERADING_CHAIN = "masquerading"
SERVICES_CHAIN = "services"
ENDPOINTS_CHECK_CHAIN = "endpoints-check"
NO_LOCALHOST = "ip daddr != 127.0.0.0/8"

# (name, type, hook, priority). kube-proxy: filter at dstnat-10 so filtering sees
# pre-DNAT addresses; nat at dstnat / srcnat.
BASE_CHAINS = (
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
JUMPS = (
    (ENDPOINTS_CHECK_CHAIN, "filter-input", "ct state new "),
    (ENDPOINTS_CHECK_CHAIN, "filter-forward", "ct state new "),
    (ENDPOINTS_CHECK_CHAIN, "filter-output", "ct state new "),
    (SERVICES_CHAIN, "nat-output", ""),
    (SERVICES_CHAIN, "nat-prerouting", ""),
    (MASQUERADING_CHAIN, "nat-postrouting", ""),
)
MAP_TYPES = {
    NO_ENDPOINT_SERVICES: ("ipv4_addr . inet_proto . inet_service : verdict",
                           "vmap to drop or reject packets to services with no endpoints"),
    NO_ENDPOINT_NODEPORTS: ("inet_proto . inet_service : verdict",
                            "vmap to drop or reject packets to service nodeports with no endpoints"),
    SERVICE_IPS: ("ipv4_addr . inet_proto . inet_service : verdict",
                  "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    SERVICE_NODEPORTS: ("inet_proto . inet_service : verdict", "NodePort traffic"),
}
ELEMENT_BATCH = 500   # elements per `add element` command: fewer commands parse faster


@dataclasses.dataclass
class NftState:
    """The per-service part of the table (the skeleton is fixed).

    maps:   map name -> element key ("10.96.0.10 . tcp . 80") -> (verdict, comment)
    sets:   affinity set name -> timeout in seconds
    chains: service/external/local/endpoint chain name -> its rules, in order
    """

    maps: dict[str, dict[str, tuple[str, str]]] = dataclasses.field(
        default_factory=lambda: {m: {} for m in MAPS})
    sets: dict[str, int] = dataclasses.field(default_factory=dict)
    chains: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def _q(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def desired_state(service_ports: Iterable[ServicePort], node_name: str,
                  cluster_cidr: str) -> NftState:
    """What kube-proxy's syncProxyRules would put in the table for these ports."""
    st = NftState()
    for sp in service_ports:
        _add_service_port(st, sp, node_name, cluster_cidr)
    return st


def service_port_state(service_ports: Iterable[ServicePort], node_name: str,
                       cluster_cidr: str) -> NftState:
    """The fragment of the table that belongs to these service ports (one service's)."""
    return desired_state(service_ports, node_name, cluster_cidr)


def merge_states(fragments: Iterable[NftState]) -> NftState:
    """One state holding every fragment (fragments never share a name or map key)."""
    st = NftState()
    for frag in fragments:
        for m, elems in frag.maps.items():
            if elems:
                st.maps[m].update(elems)
        st.sets.update(frag.sets)
        st.chains.update(frag.chains)
    return st


def _add_service_port(st: NftState, sp: ServicePort, node_name: str, cluster_cidr: str) -> None:
    proto, name = sp.proto, sp.name_string
    cluster_eps = sp.ready_endpoints
    local_eps = sp.local_endpoints(node_name)
    has_endpoints = bool(cluster_eps)
    ext_local = sp.external_policy_local
    has_external_eps = sp.has_external_endpoints(node_name)
    svc_chain, local_chain, ext_chain = sp.nft_service_chain, sp.nft_local_chain, sp.nft_external_chain
    ext_policy_chain = local_chain if ext_local else svc_chain
    uses_ext_chain = has_endpoints and sp.externally_accessible

    # With no endpoints at all: reject; with endpoints but none local under
    # Local policy: drop external traffic that was not short-circuited.
    ext_filter_verdict = f"goto {REJECT_CHAIN}" if not has_endpoints else "drop"

    def vip_key(ip: str) -> str:
        return f"{ip} . {proto} . {sp.port}"

    if has_endpoints:
        st.maps[SERVICE_IPS][vip_key(sp.cluster_ip)] = (f"goto {svc_chain}", name)
    else:
        st.maps[NO_ENDPOINT_SERVICES][vip_key(sp.cluster_ip)] = (f"goto {REJECT_CHAIN}", name)
    for ip in (*sp.external_ips, *sp.load_balancer_ips):
        if has_endpoints:
            st.maps[SERVICE_IPS][vip_key(ip)] = (f"goto {ext_chain}", name)
        if not has_external_eps:
            st.maps[NO_ENDPOINT_SERVICES][vip_key(ip)] = (ext_filter_verdict, name)
    if sp.node_port:
        np_key = f"{proto} . {sp.node_port}"
        if has_endpoints:
            st.maps[SERVICE_NODEPORTS][np_key] = (f"goto {ext_chain}", name)
        if not has_external_eps:
            st.maps[NO_ENDPOINT_NODEPORTS][np_key] = (ext_filter_verdict, name)

    if not has_endpoints:
        return

    if uses_ext_chain:
        if not ext_local:
            # Endpoints may be on other nodes: masquerade so replies come back here.
            rules = [f"jump {MARK_MASQ_CHAIN}"]
        else:
            rules = [
                f"ip saddr {cluster_cidr} goto {svc_chain} comment {_q('short-circuit pod traffic')}",
                f"fib saddr type local jump {MARK_MASQ_CHAIN} comment {_q('masquerade local traffic')}",
                f"fib saddr type local goto {svc_chain} comment {_q('short-circuit local traffic')}",
            ]
        if has_external_eps:
            rules.append(f"goto {ext_policy_chain}")
        st.chains[ext_chain] = tuple(rules)

    # Chain and set names cost a hash each: compute them once per endpoint.
    ep_chain = {ep: sp.nft_endpoint_chain(ep) for ep in cluster_eps}
    aff_set = ({ep: sp.nft_affinity_set(ep) for ep in cluster_eps}
               if sp.affinity_timeout is not None else None)
    if aff_set is not None:
        for ep in cluster_eps:
            st.sets[aff_set[ep]] = sp.affinity_timeout

    # Off-cluster sources reaching a cluster IP (a route to the service range via
    # this node) are masqueraded so replies return through this node.
    masq = (f"ip daddr {sp.cluster_ip} {proto} dport {sp.port} "
            f"ip saddr != {cluster_cidr} jump {MARK_MASQ_CHAIN}")
    st.chains[svc_chain] = (masq, *_to_endpoints_rules(cluster_eps, ep_chain, aff_set))
    if ext_local and local_eps:
        st.chains[local_chain] = tuple(_to_endpoints_rules(local_eps, ep_chain, aff_set))

    for ep in cluster_eps:
        hairpin = f"ip saddr {ep.ip} jump {MARK_MASQ_CHAIN}"   # a pod reaching its own service
        dnat = f"meta l4proto {proto} dnat to {ep.ip}:{ep.port}"
        if aff_set is not None:
            st.chains[ep_chain[ep]] = (hairpin, f"update @{aff_set[ep]} {{ ip saddr }}", dnat)
        else:
            st.chains[ep_chain[ep]] = (hairpin, dnat)


def _to_endpoints_rules(eps: Sequence, ep_chain: dict, aff_set: dict | None) -> list[str]:
    """writeServiceToEndpointRules: affinity lookups, then the random choice.

    The random choice is a cascade (see the module docstring): rule i of n
    takes 1/(n-i) of what reaches it, the last takes the rest.
    """
    rules = []
    if aff_set is not None:
        for ep in eps:
            rules.append(f"ip saddr @{aff_set[ep]} goto {ep_chain[ep]}")
    n = len(eps)
    for i, ep in enumerate(eps[:-1]):
        rules.append(f"numgen random mod {n - i} 0 goto {ep_chain[ep]}")
    rules.append(f"goto {ep_chain[eps[-1]]}")
    return rules


# -- rendering -----------------------------------------------------------------

def skeleton_commands(mark: int = MASQUERADE_MARK) -> list[str]:
    """The fixed part of the table (setupNFTables), assuming the table is empty."""
    m = mark_string(mark)
    cmds = [f"add table {T} {{ comment {_q('rules for kube-proxy')} ; }}"]
    for name, ctype, hook, prio in BASE_CHAINS:
        cmds.append(f"add chain {T} {name} {{ type {ctype} hook {hook} priority {prio} ; }}")
    for chain in (ENDPOINTS_CHECK_CHAIN, SERVICES_CHAIN, MASQUERADING_CHAIN, MARK_MASQ_CHAIN):
        cmds.append(f"add chain {T} {chain}")
    cmds.append(f"add chain {T} {REJECT_CHAIN} "
                f"{{ comment {_q('helper for @no-endpoint-services / @no-endpoint-nodeports')} ; }}")
    for dst, src, extra in JUMPS:
        cmds.append(f"add rule {T} {src} {extra}jump {dst}")
    cmds += [
        f"add rule {T} {MARK_MASQ_CHAIN} mark set mark or {m}",
        f"add rule {T} {MASQUERADING_CHAIN} mark and {m} == 0 return",
        f"add rule {T} {MASQUERADING_CHAIN} mark set mark xor {m}",
        f"add rule {T} {MASQUERADING_CHAIN} masquerade fully-random",
        f"add rule {T} {REJECT_CHAIN} reject",
    ]
    for name in MAPS:
        mtype, comment = MAP_TYPES[name]
        cmds.append(f"add map {T} {name} {{ type {mtype} ; comment {_q(comment)} ; }}")
    cmds += [
        f"add rule {T} {ENDPOINTS_CHECK_CHAIN} ip daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}",
        f"add rule {T} {ENDPOINTS_CHECK_CHAIN} fib daddr type local {NO_LOCALHOST} "
        f"meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}",
        f"add rule {T} {SERVICES_CHAIN} ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
        f"add rule {T} {SERVICES_CHAIN} fib daddr type local {NO_LOCALHOST} "
        f"meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",
    ]
    return cmds


def _set_cmd(name: str, timeout: int) -> str:
    # "dynamic" as kube-proxy: the kernel would add it anyway on first update.
    return f"add set {T} {name} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}"


def _element_cmds(verb: str, mapname: str, items: Sequence[tuple[str, tuple[str, str] | None]]) -> list[str]:
    cmds = []
    for i in range(0, len(items), ELEMENT_BATCH):
        chunk = items[i:i + ELEMENT_BATCH]
        if verb == "add":
            body = ", ".join(f"{k} comment {_q(v[1])} : {v[0]}" for k, v in chunk)
        else:
            body = ", ".join(k for k, _ in chunk)
        cmds.append(f"{verb} element {T} {mapname} {{ {body} }}")
    return cmds


def _chain_block(chains: dict[str, tuple[str, ...]]) -> list[str]:
    """Chains with their rules as one `table { chain { ... } }` block.

    nft expands a block into "add chain" for every chain first, then the
    rules, so a rule may jump to a chain written further down.
    """
    if not chains:
        return []
    lines = [f"table {T} {{"]
    for c in sorted(chains):
        lines.append(f"chain {c} {{")
        lines += chains[c]
        lines.append("}")
    lines.append("}")
    return lines


def full_transaction(state: NftState, mark: int = MASQUERADE_MARK) -> str:
    """One transaction that replaces whatever table exists with the desired one.

    `add table` + `delete table` first makes it work whether or not a table was
    left behind. The transaction is atomic: a packet sees the old table or the
    new one, never an empty one. (Affinity sets start empty again, as after a
    kube-proxy restart; established flows keep their conntrack entries.)
    """
    cmds = [f"add table {T}", f"delete table {T}"]
    cmds += skeleton_commands(mark)
    cmds += [_set_cmd(n, t) for n, t in sorted(state.sets.items())]
    cmds += _chain_block(state.chains)
    for m in MAPS:
        cmds += _element_cmds("add", m, sorted(state.maps[m].items()))
    return "\n".join(cmds) + "\n"


@dataclasses.dataclass
class NftDiff:
    """What turns one per-service state into another, in the order it must be applied.

    1. del_elements: map elements that vanished or changed (map -> keys)
    2. flush_chains: chains that changed or vanished (drops their references)
    3. del_sets, then add_sets: affinity sets that vanished or changed / are new or changed
    4. add_chains (empty), then rules: the rules of the new and changed chains
    5. add_elements: map elements that are new or changed (map -> [(key, (verdict, comment))])
    6. del_chains: chains that vanished (nothing references them any more)
    """

    del_elements: dict[str, list[str]]
    flush_chains: list[str]
    del_sets: list[str]
    add_sets: list[tuple[str, int]]
    add_chains: list[str]
    rules: list[tuple[str, tuple[str, ...]]]
    add_elements: dict[str, list[tuple[str, tuple[str, str]]]]
    del_chains: list[str]

    def __bool__(self) -> bool:
        return bool(any(self.del_elements.values()) or self.flush_chains or self.del_sets or
                    self.add_sets or self.add_chains or self.rules or
                    any(self.add_elements.values()) or self.del_chains)


def state_diff(old: NftState, new: NftState) -> NftDiff:
    """The changes turning OLD into NEW (see NftDiff for the order).

    Order matters inside the transaction: references must go before what they
    reference is deleted, and must not point at something not yet created.
    """
    del_elems: dict[str, list[str]] = {}
    add_elems: dict[str, list] = {}
    for m in MAPS:
        o, n = old.maps.get(m, {}), new.maps.get(m, {})
        del_elems[m] = sorted(k for k in o if k not in n or o[k] != n[k])
        add_elems[m] = sorted((k, v) for k, v in n.items() if o.get(k) != v)

    changed_sets = {s for s in new.sets if s in old.sets and old.sets[s] != new.sets[s]}
    removed_sets = {s for s in old.sets if s not in new.sets}
    added_sets = {s for s in new.sets if s not in old.sets}
    # A set cannot be deleted while a rule names it, even if that rule's text
    # does not change: rebuild the chains that reference a changed set.
    refs = tuple(f"@{s} " for s in changed_sets)
    removed_chains = sorted(c for c in old.chains if c not in new.chains)
    changed_chains = sorted(c for c in new.chains if c in old.chains and
                            (old.chains[c] != new.chains[c] or
                             (refs and any(r in rule + " " for rule in new.chains[c] for r in refs))))
    added_chains = sorted(c for c in new.chains if c not in old.chains)
    return NftDiff(
        del_elements=del_elems,
        flush_chains=[*changed_chains, *removed_chains],
        del_sets=sorted(removed_sets | changed_sets),
        add_sets=[(s, new.sets[s]) for s in sorted(added_sets | changed_sets)],
        add_chains=added_chains,
        rules=[(c, new.chains[c]) for c in (*changed_chains, *added_chains)],
        add_elements=add_elems,
        del_chains=removed_chains)


def full_diff(state: NftState) -> NftDiff:
    """STATE as changes to an empty per-service part (a full load after the skeleton)."""
    return state_diff(NftState(), state)


def incremental_transaction(old: NftState, new: NftState) -> str:
    """One transaction turning OLD into NEW; "" when they are the same."""
    d = state_diff(old, new)
    cmds: list[str] = []
    for m in MAPS:
        cmds += _element_cmds("delete", m, [(k, None) for k in d.del_elements[m]])
    cmds += [f"flush chain {T} {c}" for c in d.flush_chains]
    cmds += [f"delete set {T} {s}" for s in d.del_sets]
    cmds += [_set_cmd(s, t) for s, t in d.add_sets]
    cmds += [f"add chain {T} {c}" for c in d.add_chains]
    for c, rules in d.rules:
        cmds += [f"add rule {T} {c} {r}" for r in rules]
    for m in MAPS:
        cmds += _element_cmds("add", m, d.add_elements[m])
    cmds += [f"delete chain {T} {c}" for c in d.del_chains]
    return "\n".join(cmds) + "\n" if cmds else ""


def cleanup_transaction() -> str:
    """Remove the whole table (CleanupLeftovers); safe if it is absent."""
    return f"add table {T}\ndelete table {T}\n"
