"""netemu.link: the commands a link is built with (pure, no root)."""

from netemu.link import End, Link


def test_node_uplink_commands_name_each_interface_and_join_the_bridge():
    link = Link(near=End("c-fabric", "up"), far=End("c-node-up", "eth0"), mtu=1400, bridge="br0",
                far_address="172.30.0.1/24")
    near, far = link.commands()
    # "name" before every interface name: a node called "up" is not ip's keyword.
    assert near == ["link add name up mtu 1400 type veth peer name eth0 mtu 1400 netns c-node-up",
                    "link set dev up master br0 up"]
    assert far == ["addr add 172.30.0.1/24 dev eth0", "link set dev eth0 up"]


def test_pod_link_commands_set_hairpin_mac_and_gso_before_up():
    link = Link(near=End("c-node-a", "veth1234567"), far=End("c-pod-x", "eth0"), mtu=1472,
                bridge="docker0", hairpin=True, far_mac="02:42:0a:f4:01:02",
                far_address="10.244.1.2/24", far_gso_max_segs=44)
    near, far = link.commands()
    assert near[-1] == "link set dev veth1234567 type bridge_slave hairpin on"
    assert far == ["link set dev eth0 address 02:42:0a:f4:01:02", "addr add 10.244.1.2/24 dev eth0",
                   "link set dev eth0 gso_max_segs 44", "link set dev eth0 up"]


# -- impairment: parsing, and the tc and nft it becomes ------------------------

import pytest

from netemu import impairment
from netemu.impairment import Impairment, ImpairmentError
from netemu.link_cli import merged
from netemu.topology.loader import load_topology


@pytest.mark.parametrize("text,bits", [("100mbit", 100_000_000), ("1gbit", 10 ** 9), ("1.5mbit", 1_500_000),
                                       ("500kbit", 500_000), ("10MBit", 10_000_000), ("1mbps", 8_000_000)])
def test_rates_are_read_in_tc_units(text, bits):
    assert impairment.parse_rate(text) == bits


@pytest.mark.parametrize("text,ppm", [("1%", 10_000), ("0.1%", 1_000), ("0.0001%", 1), ("100%", 1_000_000),
                                      ("2.5", 25_000), ("0%", 0)])
def test_percentages_are_exact_in_packets_per_million(text, ppm):
    assert impairment.parse_percent(text, "loss") == ppm


@pytest.mark.parametrize("props,message", [
    ({"rate": "fast"}, "rate: invalid rate 'fast'"),
    ({"rate": "1bit"}, "rate: 1bit is outside 8kbit..100gbit"),
    ({"loss": "101%"}, "loss: 101% is more than 100%"),
    ({"loss": "0.00001%"}, "loss: 0.00001% is finer than 0.0001%"),
    ({"duplicate": "-1%"}, "duplicate: invalid percentage '-1%'"),
    ({"limit": 50}, "limit: a queue limit needs a rate"),
    ({"rate": "1mbit", "limit": 0}, "limit: must be a number of packets from 1 to 1000000"),
    ({"delay": "10"}, "delay: invalid duration '10': use a number and one of us, ms, s"),
    ({"delay": "11s"}, "delay: 11s is more than 10s"),
    ({"jitter": "1ms"}, "jitter: jitter needs a delay to spread"),
    ({"corrupt": "1%"}, "corrupt: not supported: this kernel has no netem qdisc"),
    ({"reorder": "25%"}, "reorder: reordering needs a delay"),
    ({"latency": "1ms"}, "latency: unknown link property (allowed: rate, loss, duplicate, limit, delay"),
])
def test_bad_properties_are_one_line_errors_naming_the_property(props, message):
    with pytest.raises(ImpairmentError) as e:
        impairment.parse(props)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_rate_alone_is_a_tbf_and_with_a_limit_an_htb_with_a_pfifo():
    assert impairment.tc_commands("eth0", Impairment(rate=10_000_000), 1500) == [
        ["tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "tbf", "rate", "10000000bit",
         "burst", "15140", "limit", "1514000"]]
    cmds = impairment.tc_commands("eth0", Impairment(rate=10 ** 9, limit=100), 1500)
    assert cmds[0][6:10] == ["handle", "1:", "htb", "default"]
    assert cmds[1][1:2] + cmds[1][5:9] == ["class", "parent", "1:", "classid", "1:1"] and "htb" in cmds[1]
    assert cmds[2][5:9] == ["parent", "1:1", "handle", "10:"] and "pfifo" in cmds[2]
    assert cmds[1][-4:] == ["burst", "500000", "cburst", "500000"]   # 4 ms of 1 Gbit/s
    assert cmds[2][-2:] == ["limit", "100"]
    assert impairment.tc_commands("eth0", Impairment(loss=5), 1500) == []


def test_loss_and_duplicate_are_one_nft_table_on_the_egress_hook():
    text = impairment.nft_ruleset("eth0", Impairment(loss=10_000, duplicate=1_000), "eth0 -> fab/n1")
    assert text.startswith("table netdev netemu-link-eth0 {}\ndelete table netdev netemu-link-eth0\n")
    assert 'type filter hook egress device "eth0" priority 0; policy accept;' in text
    assert 'numgen random mod 1000000 < 10000 counter drop comment "eth0 -> fab/n1: loss 1%"' in text
    assert ('numgen random mod 1000000 < 1000 counter meta mark set 0x6e65 dup to "eth0" meta mark set 0 '
            'comment "eth0 -> fab/n1: duplicate 0.1%"') in text
    # The copy skips the rules on its second pass, before loss can drop it.
    assert text.index("meta mark 0x6e65 counter meta mark set 0 accept") < text.index("drop")
    # 100% is every packet: numgen never makes 1000000.
    assert "    counter drop comment" in impairment.nft_ruleset("eth0", Impairment(loss=1_000_000), "x")
    # Nothing to drop or copy: the transaction only deletes the table.
    assert impairment.nft_ruleset("eth0", Impairment(rate=10 ** 6), "x").count("{") == 1


def test_link_set_changes_the_given_properties_and_keeps_the_others():
    current = Impairment(rate=10_000_000, loss=10_000, limit=50)
    assert merged(current, {"loss": "2%"}) == Impairment(rate=10_000_000, loss=20_000, limit=50)
    assert merged(current, {"rate": "0"}) == Impairment(loss=10_000)
    delayed = merged(current, {"delay": "20ms", "jitter": "500us", "reorder": "25%"})
    assert (delayed.delay, delayed.jitter, delayed.reorder) == (20_000, 500, 250_000)
    assert merged(delayed, {"delay": "0"}) == current
    with pytest.raises(ImpairmentError, match=r"^--corrupt: not supported"):
        merged(current, {"corrupt": "20%"})
    # The Python API's keywords: numbers as the flags' text, errors named by the keyword.
    assert merged(current, {"loss": 2, "rate": 0}, flag="") == Impairment(loss=20_000)
    with pytest.raises(ImpairmentError, match=r"^delay: invalid duration '5'"):
        merged(current, {"delay": 5}, flag="")


def test_topology_link_keys_default_for_the_cluster_and_per_node(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("cluster:\n  link: {loss: 1%, rate: 100mbit}\n"
                 "nodes:\n  - name: a\n  - name: b\n    link: {rate: 10mbit, limit: 20}\n")
    topo = load_topology(p, host_networks=[])
    a, b = topo.nodes
    assert a.uplink(topo.settings) == Impairment(rate=100_000_000, loss=10_000)
    assert b.uplink(topo.settings) == Impairment(rate=10_000_000, loss=10_000, limit=20)


@pytest.mark.parametrize("text,message", [
    ("cluster:\n  link: {corrupt: 1%}\nnodes: [{name: a}]\n",
     "t.yaml: cluster.link.corrupt: not supported: this kernel has no netem qdisc"),
    ("nodes:\n  - name: a\n    link: {loss: lots}\n", "t.yaml: nodes[0].link.loss: invalid percentage 'lots'"),
    ("nodes:\n  - name: a\n    link: 10mbit\n", "t.yaml: nodes[0].link: must be a mapping"),
])
def test_topology_link_errors_name_file_and_field(tmp_path, text, message):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        load_topology(p, host_networks=[])
    assert str(e.value).endswith(message) or message in str(e.value)
    assert str(e.value).startswith(str(tmp_path)) and "\n" not in str(e.value)


def test_bench_link_flag_becomes_every_uplinks_impairment(tmp_path):
    import yaml

    from netemu.bench import runner
    from netemu.bench.cli import parse_link

    props = parse_link("rate 100mbit loss 0.1%")
    p = tmp_path / "hb.yaml"
    p.write_text(yaml.safe_dump(runner.topology("hb", "vxlan", 1500, props)))
    topo = load_topology(p, host_networks=[])
    assert {n.uplink(topo.settings) for n in topo.nodes} == {Impairment(rate=100_000_000, loss=1_000)}
    assert parse_link("delay 10ms loss 0.1%") == {"delay": "10ms", "loss": "0.1%"}
    with pytest.raises(ValueError, match=r"^--link: corrupt: not supported"):
        parse_link("corrupt 1%")
    with pytest.raises(ValueError, match=r"expected PROPERTY VALUE pairs"):
        parse_link("rate")


def test_delay_sends_every_frame_through_the_delay_line_after_loss_and_duplicate():
    text = impairment.nft_ruleset("eth0", Impairment(delay=20_000, loss=10_000, duplicate=1_000), "x")
    tap = impairment.tap_name("eth0")
    lines = [l.strip() for l in text.splitlines()]
    body = lines[lines.index('type filter hook egress device "eth0" priority 0; policy accept;') + 1:-2]
    # back from the delay line: out; a copy: delayed like its original; then
    # loss, duplicate, and everything left into the delay line
    assert body[0].startswith("meta mark 0x6e64 counter meta mark set 0 accept")
    assert body[1].startswith(f'meta mark 0x6e65 counter meta mark set 0 fwd to "{tap}"')
    assert "drop" in body[2] and "dup to" in body[3]
    assert body[4] == f'counter fwd to "{tap}" comment "x: into the delay line, delay 20ms"'
    assert len(tap) <= 15 and impairment.tap_name("a-very-long-nod") != tap


def test_delay_line_schedule_spreads_by_jitter_and_keeps_order():
    from netemu.delayline import Schedule

    draws = iter([1.0, 0.0, 0.5])           # +jitter, -jitter, 0
    s = Schedule(0.010, 0.004, rand=lambda: next(draws))
    assert s.due(1.0) == pytest.approx(1.014)
    # 1.001 + 0.006 would be before the frame ahead of it: it waits for it
    assert s.due(1.001) == pytest.approx(1.014)
    assert s.due(1.1) == pytest.approx(1.110)
    assert Schedule(0.001, 0.005, rand=lambda: 0.0).due(2.0) == 2.0      # never below zero


def test_delay_line_sends_the_reordered_share_at_once_and_keeps_the_others_in_order():
    from netemu.delayline import Schedule

    draws = iter([0.1, 0.3, 0.29])          # reorder 30%: below 0.3 goes at once
    s = Schedule(0.010, 0.0, reorder=0.3, rand=lambda: next(draws))
    assert s.due(1.0) is None
    assert s.due(1.0) == pytest.approx(1.010)
    assert s.due(1.002) is None


def test_a_pods_link_annotation_is_property_value_pairs():
    from netemu.node.sandbox import parse_link

    assert parse_link("") is None and parse_link("  ") is None
    assert parse_link("rate 10mbit  delay 5ms loss 1%") == Impairment(rate=10_000_000, delay=5000, loss=10_000)
    where = r"^metadata\.annotations\[netemu\.io/link\]"
    with pytest.raises(ImpairmentError, match=where + r": expected PROPERTY VALUE pairs"):
        parse_link("rate")
    with pytest.raises(ImpairmentError, match=where + r"\.rate: invalid rate 'fast'"):
        parse_link("rate fast")
    with pytest.raises(ImpairmentError, match=where + r": a property is given twice"):
        parse_link("loss 1% loss 2%")
    with pytest.raises(ImpairmentError, match=where + r"\.corrupt: not supported"):
        parse_link("corrupt 1%")


def test_a_bad_pod_link_annotation_is_refused_by_the_manifest_checks():
    import netemu

    def topology(obj):
        return {"name": "hkx", "nodes": [{"name": "a"}], "workloads": [obj]}

    bad_pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "p", "annotations": {"netemu.io/link": "loss 1% loss 2%"}},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    with pytest.raises(netemu.TopologyError, match=r"^<dict>: workloads\[0\] \(Pod p\): "
                       r"metadata\.annotations\[netemu\.io/link\]: a property is given twice"):
        netemu.load(topology(bad_pod))
    rc = {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "r"},
          "spec": {"selector": {"app": "r"}, "template": {
              "metadata": {"labels": {"app": "r"}, "annotations": {"netemu.io/link": "jitter 1ms"}},
              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
    with pytest.raises(netemu.TopologyError, match=r"spec\.template\.metadata\.annotations\[netemu\.io/link\]"
                                                   r"\.jitter: jitter needs a delay"):
        netemu.load(topology(rc))
    # Other kinds' annotations are not netemu's business; a good one loads.
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "annotations": {"netemu.io/link": "x"}},
           "spec": {"ports": [{"port": 80}]}}
    bad_pod["metadata"]["annotations"]["netemu.io/link"] = "delay 5ms rate 1mbit"
    assert netemu.load({**topology(bad_pod), "workloads": [bad_pod, svc]}).name == "hkx"


# -- link show: pods' links and a dead delay line (pure, no root) --------------

def test_a_pod_not_on_a_node_yet_has_its_settings_and_no_ends():
    from netemu import link_cli

    pod = {"metadata": {"name": "w", "namespace": "ns1", "annotations": {"netemu.io/link": "delay 5ms loss 1%"}},
           "spec": {}}
    entry = link_cli.pod_link("c", pod, {})
    assert entry == {"pod": "w", "namespace": "ns1", "node": None, "settings": {"loss": "1%", "delay": "5ms"},
                     "mechanisms": impairment.parse_words("delay 5ms loss 1%", "x").mechanisms(),
                     "ends": [], "installed": {}}


def test_link_show_says_not_running_for_a_dead_delay_line_and_not_installed_for_a_pod_without_sandbox(capsys):
    from netemu import link_cli

    imp = impairment.parse_words("delay 5ms", "x")
    line = {"qdiscs": [], "nftables": ["netemu-link-eth0"], "delayLine": None}
    result = {"a": {"settings": imp.settings(), "mechanisms": imp.mechanisms(),
                    "installed": {"c-node-a/eth0": line, "c-fabric/a": dict(line, delayLine={"pid": 1})}},
              "pod/default/w": {"pod": "w", "namespace": "default", "node": "a", "settings": imp.settings(),
                                "mechanisms": imp.mechanisms(), "ends": ["c-node-a/veth1", "c-pod-w/eth0"],
                                "installed": {"c-node-a/veth1": None, "c-pod-w/eth0": None}}}
    link_cli._print(result, None)
    rows = [line.split(None, 3) for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["LINK", "PROPERTY", "VALUE", "MECHANISM"]
    assert rows[1][:3] == ["a", "delay", "5ms"] and "NOT RUNNING" in rows[1][3]
    assert rows[2][:3] == ["pod/default/w", "delay", "5ms"]
    assert rows[2][3].endswith("(not installed: the pod has no sandbox)") and "NOT RUNNING" not in rows[2][3]


def test_an_exited_child_is_not_alive_until_reaped_and_then_gone():
    import os
    import signal
    import subprocess
    import time

    from netemu import journal
    from netemu.link import reap

    _alive = journal.running
    proc = subprocess.Popen(["sleep", "30"])
    start = journal.process_start_time(proc.pid)
    assert _alive(proc.pid, start) and not _alive(proc.pid, start + 1)
    assert not reap(proc.pid)           # running: nothing to collect
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while journal.process_start_time(proc.pid) == start and _alive(proc.pid, start) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(proc.pid, start)  # a zombie has exited
    while not reap(proc.pid):
        time.sleep(0.01)
    assert journal.process_start_time(proc.pid) is None
    proc.returncode = -9                # reaped here, not by Popen


def test_an_idle_delay_line_keeper_takes_no_thread_until_a_line_is_recorded(tmp_path, monkeypatch):
    """keep_delay_lines asks delay_lines_recorded (two stats) before each
    revive (a thread, a lock, a folder): a link without delay lines costs its
    keeper no thread hop; one whose line is recorded is revived."""
    import trio

    from netemu import link as links, names

    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path))
    link = Link(near=End("hi-x-a", "veth1"), far=End("hi-x-b", "eth0"), mtu=1500, cluster="hi-x")
    assert not link.delay_lines_recorded()
    assert not (tmp_path / "hi-x").exists()          # asking made no folder
    revived = []
    monkeypatch.setattr(Link, "revive", lambda self: revived.append(1) or [])

    async def main():
        with trio.move_on_after(0.35):
            await links.keep_delay_lines(link, "test", every=0.1)
        assert revived == []
        folder = tmp_path / "hi-x" / "links"
        folder.mkdir(parents=True, exist_ok=True)        # the keeper's bell is there
        (folder / "hi-x-b.eth0.pid").write_text("1 2 3 4 5")
        assert link.delay_lines_recorded()
        with trio.move_on_after(0.35):
            await links.keep_delay_lines(link, "test", every=0.1)
        assert revived

    trio.run(main)


def test_an_idle_delay_line_keeper_sleeps_until_its_bell_rings(tmp_path, monkeypatch):
    """An idle keeper (no delay line recorded) waits on its link's bell, not
    on a timer: nothing for a long while; ring() (what starting a delay line
    does) wakes it at once, and it revives from then on."""
    import time

    import trio

    from netemu import link as links, names

    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path))
    link = Link(near=End("hi-y-a", "veth1"), far=End("hi-y-b", "eth0"), mtu=1500, cluster="hi-y")
    link.ring()                                         # nobody listens yet: nothing happens
    revived = []
    monkeypatch.setattr(Link, "revive", lambda self: revived.append(time.monotonic()) or [])
    checks = []
    recorded = Link.delay_lines_recorded
    monkeypatch.setattr(Link, "delay_lines_recorded", lambda self: checks.append(1) or recorded(self))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(links.keep_delay_lines, link, "test", 0.1, 30.0)
            await trio.sleep(0.5)
            assert revived == [] and len(checks) <= 4       # one pass, then asleep on the bell
            (tmp_path / "hi-y" / "links" / "hi-y-b.eth0.pid").write_text("1 2 3 4 5")
            rung = time.monotonic()
            link.ring()
            await trio.sleep(0.3)
            assert revived and revived[0] - rung < 0.1
            nursery.cancel_scope.cancel()

    trio.run(main)
