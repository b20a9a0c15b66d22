"""Rule generation of the service proxy (nftables and iptables modes), no root."""

import base64
import hashlib
import socket
import struct


from netemu.proxy import iptables as ipt
from netemu.proxy import nftables as nft
from netemu.proxy import conntrack as ct
from netemu.proxy.model import ConntrackEntry, StaleFlow, build_service_ports, select_stale, stale_udp_flows

CIDR = "10.244.0.0/16"
NODE = "node-1"


def svc(name, cip, ports, type="ClusterIP", affinity=None, lb=(), policy="Cluster", ns="default", ext=()):
    s = {"metadata": {"name": name, "namespace": ns},
         "spec": {"type": type, "clusterIP": cip, "ports": ports, "externalIPs": list(ext),
                  "sessionAffinity": "ClientIP" if affinity else "None",
                  "externalTrafficPolicy": policy},
         "status": {"loadBalancer": {"ingress": [{"ip": i} for i in lb]}}}
    if affinity:
        s["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    return s


def eps(name, ips, ports, ns="default", node=NODE):
    return {"metadata": {"name": name, "namespace": ns},
            "subsets": [{"addresses": [{"ip": ip, "nodeName": node} for ip in ips],
                         "ports": ports}] if ips else []}


HTTP = [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]
HTTP_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def ports_of(services, endpoints):
    return build_service_ports(services, endpoints)


def nft_state(services, endpoints):
    return nft.desired_state(ports_of(services, endpoints), NODE, CIDR)


def ipt_state(services, endpoints):
    return ipt.desired_state(ports_of(services, endpoints), NODE, CIDR)


def b32(text):
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


# -- chain names -----------------------------------------------------------------

def test_chain_names_follow_kube_proxy_hashing():
    [sp] = ports_of([svc("web", "10.96.0.10", HTTP)], [eps("web", ["10.244.1.11"], HTTP_EP)])
    assert sp.name_string == "default/web:http"
    assert sp.ipt_svc_chain == "KUBE-SVC-" + b32("default/web:httptcp")[:16]
    assert sp.ipt_ext_chain == "KUBE-EXT-" + b32("default/web:httptcp")[:16]
    ep = sp.endpoints[0]
    assert sp.ipt_sep_chain(ep) == "KUBE-SEP-" + b32("default/web:httptcp10.244.1.11:8080")[:16]
    base = "default/web/tcp/http"
    assert sp.nft_service_chain == f"service-{b32(base)[:8]}-{base}"
    assert sp.nft_external_chain == f"external-{b32(base)[:8]}-{base}"
    epbase = "default/web/tcp/http__10.244.1.11/8080"
    assert sp.nft_endpoint_chain(ep) == f"endpoint-{b32(epbase)[:8]}-{epbase}"
    assert sp.nft_affinity_set(ep) == f"affinity-{b32(epbase)[:8]}-{epbase}"


def test_unnamed_port_uses_bare_service_name():
    [sp] = ports_of([svc("web", "10.96.0.10", [{"protocol": "TCP", "port": 80}])], [])
    assert sp.name_string == "default/web"
    assert sp.ipt_svc_chain == "KUBE-SVC-" + b32("default/webtcp")[:16]
    assert sp.nft_service_chain.endswith("-default/web/tcp/")


def test_headless_and_external_name_services_are_skipped():
    services = [svc("h", "None", HTTP), {"metadata": {"name": "x"}, "spec": {"type": "ExternalName"}}]
    assert ports_of(services, []) == []


def test_not_ready_addresses_are_kept_but_not_used():
    e = eps("web", ["10.244.1.11"], HTTP_EP)
    e["subsets"][0]["notReadyAddresses"] = [{"ip": "10.244.1.12"}]
    [sp] = ports_of([svc("web", "10.96.0.10", HTTP)], [e])
    assert [(x.ip, x.ready) for x in sp.endpoints] == [("10.244.1.11", True), ("10.244.1.12", False)]
    assert "10.244.1.12" not in nft.full_transaction(nft_state([svc("web", "10.96.0.10", HTTP)], [e]))


# -- nftables --------------------------------------------------------------------

def test_nft_clusterip_two_endpoints():
    st = nft_state([svc("web", "10.96.0.10", HTTP)], [eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP)])
    [sp] = ports_of([svc("web", "10.96.0.10", HTTP)], [eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP)])
    e1, e2 = sp.endpoints
    assert st.maps["service-ips"] == {"10.96.0.10 . tcp . 80": (f"goto {sp.nft_service_chain}", "default/web:http")}
    assert st.chains[sp.nft_service_chain] == (
        "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
        f"numgen random mod 2 0 goto {sp.nft_endpoint_chain(e1)}",
        f"goto {sp.nft_endpoint_chain(e2)}",
    )
    assert st.chains[sp.nft_endpoint_chain(e1)] == (
        "ip saddr 10.244.1.11 jump mark-for-masquerade",
        "meta l4proto tcp dnat to 10.244.1.11:8080",
    )
    text = nft.full_transaction(st)
    assert "add table ip kube-proxy" in text
    assert "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips" in text
    assert ("add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 "
            "meta l4proto . th dport vmap @service-nodeports") in text
    assert "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x004000" in text
    assert "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }" in text
    assert (f'add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 80 comment "default/web:http" '
            f": goto {sp.nft_service_chain} }}") in text


def test_nft_random_cascade_for_four_endpoints():
    ips = [f"10.244.1.1{i}" for i in range(1, 5)]
    st = nft_state([svc("web", "10.96.0.10", HTTP)], [eps("web", ips, HTTP_EP)])
    [sp] = ports_of([svc("web", "10.96.0.10", HTTP)], [eps("web", ips, HTTP_EP)])
    chains = [sp.nft_endpoint_chain(ep) for ep in sp.endpoints]
    # rule i of n takes 1/(n-i) of what reaches it: 1/4, then 1/3 of 3/4, ... uniform
    assert st.chains[sp.nft_service_chain][1:] == (
        f"numgen random mod 4 0 goto {chains[0]}", f"numgen random mod 3 0 goto {chains[1]}",
        f"numgen random mod 2 0 goto {chains[2]}", f"goto {chains[3]}")
    one = nft_state([svc("web", "10.96.0.10", HTTP)], [eps("web", ips[:1], HTTP_EP)])
    assert one.chains[sp.nft_service_chain][1:] == (f"goto {chains[0]}",)
    assert "vmap {" not in nft.full_transaction(st)       # no anonymous maps anywhere


def test_nft_full_transaction_writes_chains_as_one_block():
    st = nft_state([svc("web", "10.96.0.10", HTTP)], [eps("web", ["10.244.1.11"], HTTP_EP)])
    [sp] = ports_of([svc("web", "10.96.0.10", HTTP)], [eps("web", ["10.244.1.11"], HTTP_EP)])
    lines = nft.full_transaction(st).splitlines()
    start = lines.index("table ip kube-proxy {")
    assert lines[start + 1] == f"chain {sp.nft_endpoint_chain(sp.endpoints[0])} {{"
    assert lines[start + 2:start + 5] == ["ip saddr 10.244.1.11 jump mark-for-masquerade",
                                          "meta l4proto tcp dnat to 10.244.1.11:8080", "}"]
    assert lines[start + 5] == f"chain {sp.nft_service_chain} {{"


def test_nft_fragments_merge_to_the_whole_state():
    services = [svc("web", "10.96.0.10", HTTP), svc("api", "10.96.0.20", HTTP, type="NodePort")]
    services[1]["spec"]["ports"] = [dict(HTTP[0], nodePort=30080)]
    e = [eps("web", ["10.244.1.11"], HTTP_EP), eps("api", ["10.244.1.13"], HTTP_EP)]
    frags = [nft.service_port_state(ports_of([s], e), NODE, CIDR) for s in services]
    assert nft.merge_states(frags) == nft_state(services, e)


def test_nft_nodeport_and_loadbalancer():
    s = svc("web", "10.96.0.10", [dict(HTTP[0], nodePort=30080)], type="LoadBalancer", lb=["172.30.0.200"])
    st = nft_state([s], [eps("web", ["10.244.1.11"], HTTP_EP)])
    [sp] = ports_of([s], [eps("web", ["10.244.1.11"], HTTP_EP)])
    assert st.maps["service-nodeports"] == {"tcp . 30080": (f"goto {sp.nft_external_chain}", "default/web:http")}
    assert st.maps["service-ips"]["172.30.0.200 . tcp . 80"] == (f"goto {sp.nft_external_chain}", "default/web:http")
    assert st.chains[sp.nft_external_chain] == ("jump mark-for-masquerade", f"goto {sp.nft_service_chain}")


def test_nft_local_policy_short_circuits_and_drops_without_local_endpoints():
    s = svc("web", "10.96.0.10", [dict(HTTP[0], nodePort=30080)], type="NodePort", policy="Local")
    st = nft_state([s], [eps("web", ["10.244.2.11"], HTTP_EP, node="node-2")])
    [sp] = ports_of([s], [])
    ext = st.chains[sp.nft_external_chain]
    assert ext[0].startswith(f"ip saddr 10.244.0.0/16 goto {sp.nft_service_chain}")
    assert all("goto local-" not in r for r in ext)          # no local endpoint
    assert st.maps["no-endpoint-nodeports"] == {"tcp . 30080": ("drop", "default/web:http")}
    st2 = nft_state([s], [eps("web", ["10.244.1.11"], HTTP_EP)])
    assert st2.chains[sp.nft_external_chain][-1] == f"goto {sp.nft_local_chain}"
    assert sp.nft_local_chain in st2.chains


def test_nft_affinity_sets_and_rules():
    s = svc("web", "10.96.0.10", HTTP, affinity=600)
    st = nft_state([s], [eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP)])
    [sp] = ports_of([s], [eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP)])
    e1 = sp.endpoints[0]
    aset = sp.nft_affinity_set(e1)
    assert st.sets[aset] == 600
    assert f"ip saddr @{aset} goto {sp.nft_endpoint_chain(e1)}" in st.chains[sp.nft_service_chain]
    assert f"update @{aset} {{ ip saddr }}" in st.chains[sp.nft_endpoint_chain(e1)]
    assert f"add set ip kube-proxy {aset} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 600s ; }}" \
        in nft.full_transaction(st)


def test_nft_service_without_endpoints_is_rejected():
    s = svc("web", "10.96.0.10", [dict(HTTP[0], nodePort=30080)], type="NodePort")
    st = nft_state([s], [])
    assert st.maps["service-ips"] == {} and st.chains == {}
    assert st.maps["no-endpoint-services"] == {"10.96.0.10 . tcp . 80": ("goto reject-chain", "default/web:http")}
    assert st.maps["no-endpoint-nodeports"] == {"tcp . 30080": ("goto reject-chain", "default/web:http")}
    text = nft.full_transaction(st)
    assert "add rule ip kube-proxy reject-chain reject" in text
    assert "add rule ip kube-proxy filter-forward ct state new jump endpoints-check" in text


def test_nft_multiport_named_ports_and_udp():
    ports = [{"name": "dns", "protocol": "UDP", "port": 53}, {"name": "dns-tcp", "protocol": "TCP", "port": 53}]
    e = eps("dns", ["10.244.1.11"], [{"name": "dns", "port": 5353, "protocol": "UDP"},
                                     {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}], ns="kube-system")
    st = nft_state([svc("dns", "10.96.0.53", ports, ns="kube-system")], [e])
    assert set(st.maps["service-ips"]) == {"10.96.0.53 . udp . 53", "10.96.0.53 . tcp . 53"}
    udp_sp, tcp_sp = sorted(ports_of([svc("dns", "10.96.0.53", ports, ns="kube-system")], [e]),
                            key=lambda p: p.protocol, reverse=True)
    assert udp_sp.name_string == "kube-system/dns:dns"
    assert "meta l4proto udp dnat to 10.244.1.11:5353" in st.chains[udp_sp.nft_endpoint_chain(udp_sp.endpoints[0])]
    assert "meta l4proto tcp dnat to 10.244.1.11:5354" in st.chains[tcp_sp.nft_endpoint_chain(tcp_sp.endpoints[0])]


def _cmd_lines(text):
    return [l for l in text.splitlines() if l]


def test_nft_incremental_remove_endpoint_touches_only_that_service():
    services = [svc("web", "10.96.0.10", HTTP), svc("api", "10.96.0.20", HTTP)]
    before = [eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP), eps("api", ["10.244.1.13"], HTTP_EP)]
    after = [eps("web", ["10.244.1.11"], HTTP_EP), eps("api", ["10.244.1.13"], HTTP_EP)]
    tx = nft.incremental_transaction(nft_state(services, before), nft_state(services, after))
    lines = _cmd_lines(tx)
    assert all("default/api" not in l for l in lines)
    gone = [c for c in nft_state(services, before).chains if "10.244.1.12" in c][0]
    assert lines[-1] == f"delete chain ip kube-proxy {gone}"
    assert any(l.startswith("flush chain ip kube-proxy service-") for l in lines)
    assert not any("element" in l for l in lines)          # the cluster IP still maps to the same chain
    assert nft.incremental_transaction(nft_state(services, after), nft_state(services, after)) == ""


def test_nft_incremental_add_and_remove_service():
    web = svc("web", "10.96.0.10", HTTP)
    api = svc("api", "10.96.0.20", HTTP)
    e = [eps("web", ["10.244.1.11"], HTTP_EP), eps("api", ["10.244.1.13"], HTTP_EP)]
    one, two = nft_state([web], e), nft_state([web, api], e)
    add = _cmd_lines(nft.incremental_transaction(one, two))
    assert add and all("default/api" in l for l in add)
    assert any(l.startswith("add element ip kube-proxy service-ips { 10.96.0.20 . tcp . 80") for l in add)
    rm = _cmd_lines(nft.incremental_transaction(two, one))
    assert rm[0] == "delete element ip kube-proxy service-ips { 10.96.0.20 . tcp . 80 }"
    assert all("default/api" in l or "10.96.0.20" in l for l in rm)
    # references go before what they reference is deleted
    assert [l.split()[0] for l in rm] == ["delete", "flush", "flush", "delete", "delete"]


def test_nft_incremental_affinity_timeout_change_rebuilds_referencing_chains():
    e = [eps("web", ["10.244.1.11"], HTTP_EP)]
    a = nft_state([svc("web", "10.96.0.10", HTTP, affinity=100)], e)
    b = nft_state([svc("web", "10.96.0.10", HTTP, affinity=200)], e)
    lines = _cmd_lines(nft.incremental_transaction(a, b))
    i_del = next(i for i, l in enumerate(lines) if l.startswith("delete set"))
    flushed = [i for i, l in enumerate(lines) if l.startswith("flush chain")]
    assert len(flushed) == 2 and max(flushed) < i_del


# -- iptables --------------------------------------------------------------------

def test_ipt_clusterip_two_endpoints():
    services = [svc("web", "10.96.0.10", HTTP)]
    e = [eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP)]
    st = ipt_state(services, e)
    [sp] = ports_of(services, e)
    e1, e2 = sp.endpoints
    svc_c, sep1, sep2 = sp.ipt_svc_chain, sp.ipt_sep_chain(e1), sp.ipt_sep_chain(e2)
    assert (f'-A KUBE-SERVICES -m comment --comment "default/web:http cluster IP" -m tcp -p tcp '
            f"-d 10.96.0.10 --dport 80 -j {svc_c}") in st.nat_rules
    assert st.nat_chains[svc_c] == (
        f'-A {svc_c} -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 '
        f"--dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
        f'-A {svc_c} -m comment --comment "default/web:http -> 10.244.1.11:8080" -m statistic --mode random '
        f"--probability 0.5000000000 -j {sep1}",
        f'-A {svc_c} -m comment --comment "default/web:http -> 10.244.1.12:8080" -j {sep2}',
    )
    assert st.nat_chains[sep1] == (
        f"-A {sep1} -m comment --comment default/web:http -s 10.244.1.11 -j KUBE-MARK-MASQ",
        f"-A {sep1} -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.11:8080",
    )
    text = ipt.restore_input(st)
    assert text.startswith("*filter\n:KUBE-SERVICES - [0:0]\n")
    assert "-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" in text
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000" in text
    assert st.nat_rules[-1].endswith("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS")


def test_ipt_probabilities_for_four_endpoints():
    e = [eps("web", [f"10.244.1.1{i}" for i in range(4)], HTTP_EP)]
    st = ipt_state([svc("web", "10.96.0.10", HTTP)], e)
    [chain] = [c for c in st.nat_chains if c.startswith("KUBE-SVC-")]
    probs = [r.split("--probability ")[1].split()[0] for r in st.nat_chains[chain] if "--probability" in r]
    assert probs == ["0.2500000000", "0.3333333333", "0.5000000000"]


def test_ipt_nodeport_loadbalancer_affinity():
    s = svc("web", "10.96.0.10", [dict(HTTP[0], nodePort=30080)], type="LoadBalancer",
            lb=["172.30.0.200"], affinity=10800)
    e = [eps("web", ["10.244.1.11"], HTTP_EP)]
    st = ipt_state([s], e)
    [sp] = ports_of([s], e)
    ext, sep = sp.ipt_ext_chain, sp.ipt_sep_chain(sp.endpoints[0])
    assert f"-A KUBE-NODEPORTS -m comment --comment default/web:http -m tcp -p tcp --dport 30080 -j {ext}" in st.nat_rules
    assert (f'-A KUBE-SERVICES -m comment --comment "default/web:http loadbalancer IP" -m tcp -p tcp '
            f"-d 172.30.0.200 --dport 80 -j {ext}") in st.nat_rules
    assert st.nat_chains[ext][-1] == f"-A {ext} -j {sp.ipt_svc_chain}"
    assert any(f"-m recent --name {sep} --rcheck --seconds 10800 --reap -j {sep}" in r
               for r in st.nat_chains[sp.ipt_svc_chain])
    assert f"-m recent --name {sep} --set -m tcp -p tcp -j DNAT" in st.nat_chains[sep][1]


def test_ipt_no_endpoints_rejects_in_filter():
    s = svc("web", "10.96.0.10", [dict(HTTP[0], nodePort=30080)], type="NodePort")
    st = ipt_state([s], [])
    assert st.nat_chains == {}
    assert ('-A KUBE-SERVICES -m comment --comment "default/web:http has no endpoints" -m tcp -p tcp '
            "-d 10.96.0.10 --dport 80 -j REJECT") in st.filter_rules
    assert any(r.startswith("-A KUBE-EXTERNAL-SERVICES") and "--dport 30080 -j REJECT" in r
               for r in st.filter_rules)


def test_ipt_partial_restore_writes_only_changed_chains_and_deletes_stale():
    services = [svc("web", "10.96.0.10", HTTP), svc("api", "10.96.0.20", HTTP)]
    before = ipt_state(services, [eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP),
                                  eps("api", ["10.244.1.13"], HTTP_EP)])
    after = ipt_state(services, [eps("web", ["10.244.1.11"], HTTP_EP), eps("api", ["10.244.1.13"], HTTP_EP)])
    text = ipt.restore_input(after, before)
    [stale] = set(before.nat_chains) - set(after.nat_chains)
    assert f"-X {stale}" in text and f":{stale} - [0:0]" in text
    api_chains = [c for c, rules in after.nat_chains.items() if "default/api" in rules[0]]
    assert api_chains and not any(f":{c} " in text for c in api_chains)
    assert "-I " not in text                                 # jump rules only on full syncs
    # KUBE-SERVICES is unchanged (both services still have endpoints): not rewritten
    assert ":KUBE-SERVICES " not in text and "-A KUBE-SERVICES " not in text
    assert ipt.restore_input(after, after) == ipt.EMPTY_RESTORE


def test_ipt_top_level_chain_rewritten_whole_when_a_service_appears():
    web = svc("web", "10.96.0.10", HTTP)
    e = [eps("web", ["10.244.1.11"], HTTP_EP), eps("api", ["10.244.1.13"], HTTP_EP)]
    text = ipt.restore_input(ipt_state([web, svc("api", "10.96.0.20", HTTP)], e), ipt_state([web], e))
    nat = text.split("*nat\n")[1]
    assert ":KUBE-SERVICES - [0:0]" in nat                   # flushed, then every rule again
    assert '-A KUBE-SERVICES -m comment --comment "default/web:http cluster IP"' in nat
    assert '-A KUBE-SERVICES -m comment --comment "default/api:http cluster IP"' in nat
    assert "kubernetes service nodeports; NOTE" in nat       # and its last rule stays last
    assert ":KUBE-POSTROUTING" not in nat


def test_ipt_jump_rules_not_duplicated_when_present():
    saved = "*nat\n:PREROUTING ACCEPT [0:0]\n" \
            '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\nCOMMIT\n'
    missing = ipt.missing_jumps(saved)
    assert ("nat", '-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES') not in missing
    assert ("nat", '-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES') in missing


# -- conntrack -------------------------------------------------------------------

def test_conntrack_flush_for_removed_udp_endpoint_only():
    dns = svc("dns", "10.96.0.53", [{"name": "dns", "protocol": "UDP", "port": 53}])
    web = svc("web", "10.96.0.10", HTTP)
    udp_ep = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    old = ports_of([dns, web], [eps("dns", ["10.244.1.11", "10.244.1.12"], udp_ep),
                                eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP)])
    new = ports_of([dns, web], [eps("dns", ["10.244.1.11"], udp_ep), eps("web", ["10.244.1.11"], HTTP_EP)])
    assert stale_udp_flows(old, new) == [StaleFlow("10.96.0.53", 53, "10.244.1.12")]
    assert stale_udp_flows(new, new) == []


UDP53 = [{"name": "dns", "protocol": "UDP", "port": 53}]
UDP_EP = [{"name": "dns", "port": 5353, "protocol": "UDP"}]


def test_stale_flows_cover_nodeport_external_ips_first_endpoint_and_deleted_service():
    np = svc("np", "10.96.0.54", [dict(UDP53[0], nodePort=30053)], type="LoadBalancer",
             lb=["172.30.0.200"], ext=["172.30.0.201"])
    gone = svc("gone", "10.96.0.55", UDP53)
    first = svc("first", "10.96.0.56", UDP53)
    old = ports_of([np, gone, first], [eps("np", ["10.244.1.11", "10.244.1.12"], UDP_EP),
                                       eps("gone", ["10.244.1.13"], UDP_EP), eps("first", [], UDP_EP)])
    new = ports_of([np, first], [eps("np", ["10.244.1.11"], UDP_EP),
                                 eps("first", ["10.244.1.14"], UDP_EP)])
    assert set(stale_udp_flows(old, new)) == {
        StaleFlow("10.96.0.54", 53, "10.244.1.12"), StaleFlow("172.30.0.200", 53, "10.244.1.12"),
        StaleFlow("172.30.0.201", 53, "10.244.1.12"), StaleFlow(None, 30053, "10.244.1.12"),
        StaleFlow("10.96.0.55", 53, "10.244.1.13"),        # service deleted: its endpoints' flows
        StaleFlow("10.96.0.56", 53, None)}                 # first endpoint: the rejected flows


def _entry(dst, dport, reply_src, proto=17, src="10.244.1.20", sport=40000):
    return ConntrackEntry(proto, src, dst, sport, dport, reply_src)


def test_select_stale_picks_exactly_the_flows_entries():
    flows = [StaleFlow("10.96.0.53", 53, "10.244.1.12"), StaleFlow(None, 30053, "10.244.1.12"),
             StaleFlow("10.96.0.56", 53, None)]
    hit = [_entry("10.96.0.53", 53, "10.244.1.12"),
           _entry("172.30.0.10", 30053, "10.244.1.12"),      # node port: any node address
           _entry("10.96.0.56", 53, "10.96.0.56")]           # a rejected flow (no DNAT)
    miss = [_entry("10.96.0.56", 53, "10.244.1.14"),         # DNATed to the new endpoint since
            _entry("10.96.0.53", 53, "10.244.1.11"),         # an endpoint still there
            _entry("10.96.0.53", 54, "10.244.1.12"),         # another port
            _entry("10.96.0.54", 53, "10.244.1.12"),         # another VIP
            _entry("10.96.0.53", 53, "10.244.1.12", proto=6),  # TCP is left alone
            _entry("172.30.0.10", 30054, "10.244.1.12")]
    assert select_stale(miss + hit, flows) == hit
    assert select_stale(hit, []) == []


def test_mass_removal_is_one_filter_set_and_one_pass():
    """29 UDP services x 200 endpoints deleted: every flow to a removed endpoint is
    selected from one list of entries, and the others are left."""
    services = [svc(f"u{i}", f"10.96.1.{i}", UDP53) for i in range(29)]
    ips = [f"10.244.{2 + j // 250}.{j % 250 + 1}" for j in range(200)]
    old = ports_of(services, [eps(f"u{i}", ips, UDP_EP) for i in range(29)])
    flows = stale_udp_flows(old, [])
    assert len(flows) == 29 * 200
    entries = [_entry(f"10.96.1.{i}", 53, ips[(i * 7 + k) % 200], sport=1000 + k)
               for i in range(29) for k in range(50)]
    keep = [_entry("10.96.2.1", 53, ips[0]), _entry("10.96.1.1", 53, "10.244.9.9")]
    assert select_stale(entries + keep, flows) == entries


def test_conntrack_delete_message_and_dump_entry_round_trip():
    e = ConntrackEntry(17, "10.244.1.20", "10.96.0.53", 40000, 53, "10.244.1.12", id=0x1234, zone=0)
    msg = ct.delete_request(e, seq=7)
    length, mtype, flags, seq, _ = struct.unpack_from("<IHHII", msg)
    assert (length, mtype, flags, seq) == (len(msg), 0x102, 0x5, 7)
    # A kernel dump entry: the same layout plus a reply tuple and other attributes.
    reply = ct._nest(ct.CTA_TUPLE_REPLY,
                     ct._nest(ct.CTA_TUPLE_IP, ct._attr(1, socket.inet_aton("10.244.1.12")),
                              ct._attr(2, socket.inet_aton("10.244.1.20"))),
                     ct._nest(ct.CTA_TUPLE_PROTO, ct._attr(1, b"\x11"), ct._attr(2, b"\x14\xe9"),
                              ct._attr(3, b"\x9c\x40")))
    status = ct._attr(3, struct.pack(">I", 0x1aa))
    payload = msg[16:] + reply + status
    assert ct.parse_entry(payload) == e
    assert ct.parse_entry(payload[:-len(reply + status)]) is None     # no reply tuple
    # Lengths that overrun the message are not read past.
    for cut in range(4, len(payload)):
        ct.parse_entry(payload[:cut])


def test_nft_diff_of_changed_fragments_equals_diff_of_whole_tables():
    """What the proxier relies on to send only the changed services' rules."""
    services = [svc("web", "10.96.0.10", HTTP), svc("api", "10.96.0.20", HTTP, affinity=60),
                svc("db", "10.96.0.30", HTTP)]
    before = [eps("web", ["10.244.1.11", "10.244.1.12"], HTTP_EP), eps("api", ["10.244.1.13"], HTTP_EP),
              eps("db", ["10.244.1.14"], HTTP_EP)]
    after = [before[0], eps("api", ["10.244.1.15", "10.244.1.16"], HTTP_EP), before[2]]
    whole = nft.incremental_transaction(nft_state(services, before), nft_state(services, after))
    old_api = nft.service_port_state(ports_of([services[1]], before), NODE, CIDR)
    new_api = nft.service_port_state(ports_of([services[1]], after), NODE, CIDR)
    assert nft.incremental_transaction(old_api, new_api) == whole != ""


def test_ipt_fragments_assemble_to_the_whole_state():
    services = [svc("web", "10.96.0.10", [dict(HTTP[0], nodePort=30080)], type="NodePort"),
                svc("api", "10.96.0.20", HTTP), svc("none", "10.96.0.30", HTTP)]
    e = [eps("web", ["10.244.1.11"], HTTP_EP), eps("api", ["10.244.1.13"], HTTP_EP)]
    frags = [ipt.service_port_rules(ports_of([s], e), NODE, CIDR)
             for s in sorted(services, key=lambda s: s["metadata"]["name"])]
    assert ipt.assemble(frags) == ipt_state(services, e)
