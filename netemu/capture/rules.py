"""Which rule DNATed a traced probe: the path through kube-proxy's (and the cloud
load balancer's) rules, read back from the kernel's own listings.

`netemu trace` sees in its captures that the destination changed (ClusterIP ->
pod IP); this module names the rules that did it, as a person would find them
with `nft list table ip kube-proxy` or `iptables-save -t nat`:

    nftables: map service-ips (or service-nodeports) element -> [external-* chain]
              -> service-* chain (numgen vmap) -> endpoint-* chain's `dnat to`
    iptables: KUBE-SERVICES (or KUBE-NODEPORTS) rule -> [KUBE-EXT-*] -> KUBE-SVC-*
              rule to the KUBE-SEP-* chain -> its DNAT rule
    cloud-lb: `ip cloud-lb` prerouting jump -> lb-N chain -> lb-N-node-K `dnat to`

The finders are pure (listing text in, lines out) and return the rules with
their comments, so the service they serve is named; `lookup` runs the listing
command in a namespace.
"""

from __future__ import annotations

import re

HANDLE_RE = re.compile(r"\s*# handle \d+\s*$")


# --- nftables --------------------------------------------------------------------

def parse_nft(listing: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """`nft list table` text as (chains: name -> rules, maps: name -> elements),
    rules and elements without their `# handle N` suffix."""
    chains: dict[str, list[str]] = {}
    maps: dict[str, list[str]] = {}
    block: tuple[str, str] | None = None      # ("chain"|"map", name)
    elements: list[str] | None = None          # text of an `elements = { ... }` being read
    for raw in listing.splitlines():
        line = HANDLE_RE.sub("", raw).strip()
        if elements is not None:
            elements.append(line)
            if line.endswith("}"):
                text = " ".join(elements)
                maps[block[1]] = [e.strip() for e in _split_top(text[text.index("{") + 1:text.rindex("}")])]
                elements = None
            continue
        m = re.match(r"(chain|map|set)\s+(\S+)\s*\{", line)
        if m:
            block = (m.group(1), m.group(2).strip('"'))
            if block[0] == "chain":
                chains[block[1]] = []
            continue
        if line == "}":
            block = None
            continue
        if block is None:
            continue
        if block[0] == "map" and line.startswith("elements = {"):
            elements = [line]
            if line.endswith("}"):
                maps[block[1]] = [e.strip() for e in _split_top(line[line.index("{") + 1:line.rindex("}")])]
                elements = None
        elif block[0] == "chain" and line and not line.startswith(("type ", "comment ", "policy ")):
            chains[block[1]].append(line)
    return chains, maps


def _split_top(text: str) -> list[str]:
    """Split map elements on commas outside quotes and braces."""
    out, cur, depth, quoted = [], [], 0, False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "{":
            depth += 1
        elif not quoted and ch == "}":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def _goto_targets(rule: str) -> list[str]:
    return [t.strip('"') for t in re.findall(r"\b(?:goto|jump)\s+([^\s,}]+)", rule)]


def find_nft_rule(listing: str, vip: str | None, proto: str, port: int, endpoint: str) -> list[str]:
    """The rules of `ip kube-proxy` that take VIP . PROTO . PORT (or, VIP None, the
    NodePort PROTO . PORT) to ENDPOINT ("ip:port"); [] if the table has none."""
    chains, maps = parse_nft(listing)
    key = f"{vip} . {proto} . {port}" if vip else f"{proto} . {port}"
    map_name = "service-ips" if vip else "service-nodeports"
    element = next((e for e in maps.get(map_name, [])
                    if e == key or e.startswith(key + " ") or e.startswith(key + ":")), None)
    if element is None:
        return []
    out = [f"map {map_name}: {element}"]
    targets = _goto_targets(element)
    chain = targets[0] if targets else None
    if chain and chain.startswith("external-"):
        out += [f"chain {chain}: {r}" for r in chains.get(chain, [])]
        chain = next((t for r in chains.get(chain, []) for t in _goto_targets(r)
                      if t.startswith("service-")), None)
    ep_chain = None
    if chain:
        for r in chains.get(chain, []):
            ep = next((t for t in _goto_targets(r) if t.startswith("endpoint-") and t.endswith(
                "__" + endpoint.replace(":", "/"))), None)
            if ep:
                out.append(f"chain {chain}: {r}")
                ep_chain = ep
                break
    if ep_chain:
        out += [f"chain {ep_chain}: {r}" for r in chains.get(ep_chain, []) if "dnat to" in r]
    return out


def find_lb_rule(listing: str, external_ip: str, proto: str, port: int, node_address: str) -> list[str]:
    """The rules of the cloud load balancer's `ip cloud-lb` table that send
    EXTERNAL_IP:PORT to NODE_ADDRESS (a node's NodePort), and its masquerade."""
    chains, _ = parse_nft(listing)
    out = []
    for r in chains.get("prerouting", []):
        if f"ip daddr {external_ip} " in r and re.search(rf"\b{proto} dport {port}\b", r):
            out.append(f"chain prerouting: {r}")
            for chain in _goto_targets(r):
                out += [f"chain {chain}: {x}" for x in chains.get(chain, []) if "numgen" in x]
                for x in chains.get(chain, []):
                    for sub in _goto_targets(x):
                        out += [f"chain {sub}: {y}" for y in chains.get(sub, [])
                                if f"dnat to {node_address}:" in y]
            break
    if out:
        out += [f"chain postrouting: {r}" for r in chains.get("postrouting", []) if "masquerade" in r]
    return out


# --- iptables ----------------------------------------------------------------------

def find_iptables_rule(save: str, vip: str | None, proto: str, port: int, endpoint: str) -> list[str]:
    """The `iptables-save -t nat` rules that take VIP:PORT (or, VIP None, the
    NodePort PORT) to ENDPOINT ("ip:port"); [] if none match."""
    rules = [line for line in save.splitlines() if line.startswith("-A ")]

    def chain_rules(chain: str) -> list[str]:
        return [r for r in rules if r.startswith(f"-A {chain} ")]

    def jump(rule: str) -> str | None:
        m = re.search(r"-j (KUBE-\S+)", rule)
        return m.group(1) if m else None

    top = "KUBE-SERVICES" if vip else "KUBE-NODEPORTS"
    entry = next((r for r in chain_rules(top)
                  if (not vip or f"-d {vip}/32" in r) and f"-p {proto}" in r
                  and re.search(rf"--dport {port}\b", r) and jump(r)), None)
    if entry is None:
        return []
    out = [entry]
    chain = jump(entry)
    if chain.startswith("KUBE-EXT-"):
        ext = chain_rules(chain)
        out += ext
        chain = next((jump(r) for r in ext if (jump(r) or "").startswith(("KUBE-SVC-", "KUBE-SVL-"))), None)
    seps = {}
    for r in chain_rules(chain) if chain else []:
        target = jump(r)
        if target and target.startswith("KUBE-SEP-"):
            seps[target] = r
    for sep, svc_rule in seps.items():
        dnat = [r for r in chain_rules(sep) if f"--to-destination {endpoint}" in r]
        if dnat:
            return out + [svc_rule] + dnat
    return out


# --- asking a namespace --------------------------------------------------------------

def lookup(ns: str, mode: str, vip: str | None, proto: str, port: int, endpoint: str) -> list[str]:
    """The DNAT rules in namespace NS (a node) for VIP:PORT -> ENDPOINT, in MODE
    ("nftables" or "iptables"), headed by where they are; [] when not found."""
    from netemu import netns

    if mode == "iptables":
        out = netns.run(ns, ["iptables-save", "-t", "nat"], check=False, timeout=10)
        found = find_iptables_rule(out.stdout, vip, proto, port, endpoint) if out.returncode == 0 else []
        return ["iptables -t nat:"] + ["  " + r for r in found] if found else []
    out = netns.run(ns, ["nft", "list", "table", "ip", "kube-proxy"], check=False, timeout=10)
    found = find_nft_rule(out.stdout, vip, proto, port, endpoint) if out.returncode == 0 else []
    return ["nftables table ip kube-proxy:"] + ["  " + r for r in found] if found else []


def lookup_lb(ns: str, external_ip: str, proto: str, port: int, node_address: str) -> list[str]:
    from netemu import netns

    out = netns.run(ns, ["nft", "list", "table", "ip", "cloud-lb"], check=False, timeout=10)
    found = find_lb_rule(out.stdout, external_ip, proto, port, node_address) if out.returncode == 0 else []
    return ["nftables table ip cloud-lb:"] + ["  " + r for r in found] if found else []
