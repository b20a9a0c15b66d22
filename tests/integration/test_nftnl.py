"""The netlink path (netemu.proxy.nftnl) against nft itself (root; namespaces nl-*).

The ground truth is libnftables: the same state is written both ways, in two
namespaces, and `nft list table ip kube-proxy` must print the same text. The
batches are also compared with the bytes nft sends for the same transaction
(captured with strace), message by message.
"""

import errno
import os
import re
import shutil
import struct

import pytest

from netemu import netns
from netemu.proxy import libnft, nftnl
from netemu.proxy import nftables as nft
from netemu.proxy.model import build_service_ports
from netemu.proxy.proxier import NftablesProxier
from tests.unit.test_nftnl import tree
from tests.unit.test_proxy_rules import svc

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

TEXT_NS, NL_NS = "nl-text", "nl-netlink"
KERNEL = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
NODE = "node-1"


def eps(name, ips, ports, node=NODE):
    return {"metadata": {"name": name, "namespace": "default"},
            "subsets": [{"addresses": [{"ip": ip, "nodeName": node} for ip in ips],
                         "ports": ports}] if ips else []}


HTTP = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
HTTP_EP = {"name": "http", "port": 8080, "protocol": "TCP"}
DNS = {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}
DNS_EP = {"name": "dns", "port": 5353, "protocol": "UDP"}

SERVICES = [
    svc("web", "10.96.0.10", [dict(HTTP, nodePort=30080)], type="LoadBalancer",
        lb=["172.30.0.200"], ext=["172.30.0.201"]),
    svc("local", "10.96.0.14", [dict(HTTP, nodePort=30081)], type="LoadBalancer",
        lb=["172.30.0.202"], policy="Local"),
    svc("remote", "10.96.0.15", [dict(HTTP, nodePort=30082)], type="NodePort", policy="Local"),
    svc("sticky", "10.96.0.11", [HTTP], affinity=10800),
    svc("empty", "10.96.0.12", [dict(HTTP, nodePort=30083)], type="NodePort"),
    svc("dns", "10.96.0.53", [DNS, dict(HTTP, name="tcp-dns", port=53, targetPort=5353)]),
]


def endpoints(web=("10.244.1.11", "10.244.1.12", "10.244.2.5")):
    return [eps("web", list(web), [HTTP_EP]),
            eps("local", ["10.244.1.11"], [HTTP_EP]),
            eps("remote", ["10.244.2.7"], [HTTP_EP], node="node-2"),
            eps("sticky", ["10.244.1.11", "10.244.1.12"], [HTTP_EP]),
            eps("empty", [], [HTTP_EP]),
            eps("dns", ["10.244.1.13", "10.244.2.13"], [DNS_EP, dict(HTTP_EP, name="tcp-dns", port=5353)])]


def state(eps_list, cidr="10.244.0.0/16"):
    return nft.desired_state(build_service_ports(SERVICES, eps_list), NODE, cidr)


@pytest.fixture
def two_nodes():
    for ns in (TEXT_NS, NL_NS):
        netns.delete(ns)
    try:
        for ns in (TEXT_NS, NL_NS):
            netns.create(ns)
        yield
    finally:
        for ns in (TEXT_NS, NL_NS):
            netns.delete(ns)


def listing(ns):
    return netns.run(ns, ["nft", "list", "table", "ip", nft.TABLE]).stdout


def canonical(text):
    """A listing with its chains/sets/maps sorted by name and map elements
    sorted: the order in which a table lists them is the order they were
    created in (and a hash's), which an incremental change does not keep."""
    lines = text.splitlines()
    blocks, cur = [], None
    for line in lines[1:-1]:
        if not line.strip():
            continue
        if line.startswith("\t") and not line.startswith("\t\t"):
            if line.endswith("{"):
                cur = [line]
                blocks.append(cur)
            continue
        cur.append(line)
    out = [lines[0]]
    for b in sorted(blocks):
        body = "\n".join(b)
        m = re.search(r"elements = \{ (.*?) \}$", body, re.DOTALL | re.MULTILINE)
        if m:
            elems = sorted(re.split(r",\s*\n\s*", m.group(1)))
            body = body[:m.start(1)] + "\n".join(elems) + body[m.end(1):]
        out.append(body)
    return "\n".join(out)


def run_text(ns, text):
    with netns.inside(ns), libnft.LibNft() as ctx:
        ctx.run(text)


def send(ns, diff):
    with netns.inside(ns):
        sock = nftnl.NftNetlink()
    try:
        size = sock.send(nftnl.diff_batch(diff))
        assert sock.last_acked or KERNEL < (6, 10)     # the kernel confirmed the commit
        return size
    finally:
        sock.close()


def load_netlink(ns, st):
    run_text(ns, "\n".join(nft.skeleton_commands()) + "\n")
    send(ns, nft.full_diff(st))


@pytest.mark.parametrize("cidr", ["10.244.0.0/16", "10.240.0.0/12"])
def test_full_load_lists_the_same_as_nft(two_nodes, cidr):
    st = state(endpoints(), cidr)
    assert st.sets and st.chains and all(st.maps.values())   # every part of the table is exercised
    run_text(TEXT_NS, nft.full_transaction(st))
    load_netlink(NL_NS, st)
    text = listing(TEXT_NS)
    assert 'comment "default/web:http"' in text and "update @affinity-" in text
    assert listing(NL_NS) == text


def _drop_dns(st):
    """Remove service default/dns from ST, as if it had been deleted."""
    st.chains = {c: r for c, r in st.chains.items() if "/dns/" not in c}
    for m in st.maps.values():
        for k in [k for k, v in m.items() if v[1].startswith("default/dns")]:
            del m[k]


def test_incremental_change_lists_as_a_fresh_load(two_nodes):
    before = state(endpoints())
    after = state(endpoints(web=("10.244.1.12", "10.244.3.3")))
    # Also: a service gone, one new, one changing affinity timeout.
    _drop_dns(after)
    load_netlink(NL_NS, before)
    send(NL_NS, nft.state_diff(before, after))
    # The same change as nft text lists identically, order included ...
    run_text(TEXT_NS, nft.full_transaction(before))
    run_text(TEXT_NS, nft.incremental_transaction(before, after))
    assert listing(NL_NS) == listing(TEXT_NS)
    # ... and as a fresh load of the new state, up to the order of creation.
    run_text(TEXT_NS, nft.full_transaction(after))
    assert listing(NL_NS) != listing(TEXT_NS)       # new chains come last
    assert canonical(listing(NL_NS)) == canonical(listing(TEXT_NS))
    sticky = build_service_ports([svc("sticky", "10.96.0.11", [HTTP], affinity=60)],
                                 [endpoints()[3]])
    after2 = nft.merge_states([after, nft.desired_state(sticky, NODE, "10.244.0.0/16")])
    send(NL_NS, nft.state_diff(after, after2))
    run_text(TEXT_NS, nft.full_transaction(after2))
    assert "timeout 1m" in listing(NL_NS)
    assert canonical(listing(NL_NS)) == canonical(listing(TEXT_NS))


def test_refused_batch_names_the_message_and_changes_nothing(two_nodes):
    st = state(endpoints())
    load_netlink(NL_NS, st)
    before = listing(NL_NS)
    d = nft.state_diff(nft.NftState(), nft.NftState(chains={"service-x": ("goto no-such-chain",)}))
    with pytest.raises(nftnl.NetlinkError) as exc:
        send(NL_NS, d)
    assert exc.value.errno == errno.ENOENT
    assert "add rule service-x goto no-such-chain" in str(exc.value)
    assert listing(NL_NS) == before


def test_proxier_uses_netlink_and_matches_the_text_path(two_nodes, caplog):
    services = SERVICES
    for ns, use_netlink in ((NL_NS, True), (TEXT_NS, False)):
        with netns.inside(ns):
            p = NftablesProxier(NODE, ["172.30.0.10"], "10.244.0.0/16", netlink=use_netlink)
        try:
            with netns.inside(ns):
                results = [p.sync(services, endpoints()), p.sync(services, endpoints(web=("10.244.1.12",)))]
            assert (p.netlink is not None) == use_netlink
            for r in results:
                # the kernel's part of a netlink sync is part of its time; text has none to give
                assert (0 < r.kernel_seconds < r.rules_seconds) if use_netlink else r.kernel_seconds == 0
        finally:
            p.close()
    assert "netlink" not in caplog.text          # no fallback was taken
    assert canonical(listing(NL_NS)) == canonical(listing(TEXT_NS))


def test_proxier_falls_back_to_text_when_a_rule_is_not_encodable(two_nodes, caplog, monkeypatch):
    def unsupported(rule):
        raise nftnl.Unsupported(f"test: {rule}")
    monkeypatch.setattr(nftnl, "rule_expressions", unsupported)
    with netns.inside(NL_NS):
        p = NftablesProxier(NODE, ["172.30.0.10"], "10.244.0.0/16")
    try:
        with netns.inside(NL_NS):
            p.sync(SERVICES, endpoints())
    finally:
        p.close()
    assert "goes as nft text" in caplog.text
    run_text(TEXT_NS, nft.full_transaction(state(endpoints())))
    assert listing(NL_NS) == listing(TEXT_NS)


# -- byte for byte against nft ----------------------------------------------------

def _nft_batch(ns, text):
    """The messages of the batch nft sends for TEXT: [(type, flags, body)]."""
    path = f"/tmp/{ns}-tx.nft"
    with open(path, "w") as f:
        f.write(text)
    try:
        proc = netns.run(ns, ["strace", "-e", "trace=sendmsg", "-e", "write=all", "-s", "0",
                              "nft", "-f", path], check=False)
    finally:
        os.unlink(path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bufs, cur = [], None
    for line in proc.stderr.splitlines():
        if line.startswith("sendmsg("):
            cur = bytearray()
            bufs.append(cur)
        m = re.match(r"\s*\| [0-9a-f]{5}  ((?:[0-9a-f]{2} {1,2})+)", line)
        if m and cur is not None:
            cur += bytes.fromhex(m.group(1).replace(" ", ""))
    batch = next(bytes(b) for b in bufs if struct.unpack_from("<H", b, 4)[0] == nftnl.NFNL_MSG_BATCH_BEGIN)
    return _split(batch)


def _split(data):
    out, off = [], 0
    while off < len(data):
        length, mtype, flags = struct.unpack_from("<IHH", data, off)
        out.append((mtype, flags, data[off + 16:off + length]))
        off += (length + 3) & ~3
    return out


# nft refers to sets by name and by its id for them; we send the name only.
_SET_ID = {nftnl.MSG_NEWSET: 10, nftnl.MSG_NEWSETELEM: 4, nftnl.MSG_DELSETELEM: 4}
_EXPR_SET_ID = {b"lookup\0": 4, b"dynset\0": 2}


def _normalise(msgs):
    """Attribute trees without set ids; element lists flattened (nft splits
    them by command, we by size)."""
    out = []
    for mtype, flags, body in msgs:
        if mtype in (nftnl.NFNL_MSG_BATCH_BEGIN, nftnl.NFNL_MSG_BATCH_END):
            continue
        attrs = [a for a in tree(body[4:]) if a[0] != _SET_ID.get(mtype)]
        if mtype == nftnl.MSG_NEWRULE:
            for a in attrs:
                if a[0] == 4 | nftnl.NLA_F_NESTED:
                    for _, (name_attr, data_attr) in a[1]:
                        drop = _EXPR_SET_ID.get(name_attr[1])
                        data_attr[1][:] = [x for x in data_attr[1] if x[0] != drop]
        if mtype in (nftnl.MSG_NEWSETELEM, nftnl.MSG_DELSETELEM):
            head = [a for a in attrs if a[0] != 3 | nftnl.NLA_F_NESTED]
            elems = next(a[1] for a in attrs if a[0] == 3 | nftnl.NLA_F_NESTED)
            out += [(mtype, flags, head, e[1]) for e in elems]
            continue
        out.append((mtype, flags, body[:4], attrs))
    return out


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_batches_are_the_messages_nft_sends(two_nodes):
    before = state(endpoints(), "10.240.0.0/12")
    after = state(endpoints(web=("10.244.1.12", "10.244.3.3")), "10.240.0.0/12")
    _drop_dns(after)
    after.sets = {s: 60 for s in after.sets}
    for old, new in ((nft.NftState(), before), (before, after)):
        ns = NL_NS
        netns.run(ns, ["nft", "delete", "table", "ip", nft.TABLE], check=False)
        run_text(ns, "\n".join(nft.skeleton_commands()) + "\n")
        if old.chains:
            send(ns, nft.full_diff(old))
        theirs = _normalise(_nft_batch(ns, nft.incremental_transaction(old, new)))
        ours = _normalise(_split(nftnl.diff_batch(nft.state_diff(old, new)).encode()))
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a == b


def test_full_sync_over_an_existing_table_is_one_text_transaction(two_nodes, monkeypatch):
    with netns.inside(NL_NS):
        first = NftablesProxier(NODE, ["172.30.0.10"], "10.244.0.0/16")
        second = NftablesProxier(NODE, ["172.30.0.10"], "10.244.0.0/16")
    try:
        with netns.inside(NL_NS):
            first.sync(SERVICES, endpoints())
            # A restarted daemon replaces the table atomically: no netlink batch.
            monkeypatch.setattr(nftnl.NftNetlink, "send", lambda *a: pytest.fail("netlink used"))
            second.sync(SERVICES, endpoints(web=("10.244.3.3",)))
    finally:
        first.close()
        second.close()
    run_text(TEXT_NS, nft.full_transaction(state(endpoints(web=("10.244.3.3",)))))
    assert listing(NL_NS) == listing(TEXT_NS)


def test_refused_batch_is_retried_as_text_and_netlink_left(two_nodes, caplog, monkeypatch):
    real = nftnl.rule_expressions

    def wrong(rule):          # an encoding the kernel refuses: a goto to a chain that is not there
        return real("goto no-such-chain" if rule.startswith("goto endpoint-") else rule)
    with netns.inside(NL_NS):
        p = NftablesProxier(NODE, ["172.30.0.10"], "10.244.0.0/16")
    try:
        with netns.inside(NL_NS):
            p.sync(SERVICES, endpoints())
            assert p.netlink is not None
            monkeypatch.setattr(nftnl, "rule_expressions", wrong)
            p.sync(SERVICES, endpoints(web=("10.244.3.3",)))
        assert p.netlink is None
    finally:
        p.close()
    assert "retrying as nft text" in caplog.text and "No such file or directory" in caplog.text
    run_text(TEXT_NS, nft.full_transaction(state(endpoints())))
    run_text(TEXT_NS, nft.incremental_transaction(state(endpoints()), state(endpoints(web=("10.244.3.3",)))))
    assert listing(NL_NS) == listing(TEXT_NS)
