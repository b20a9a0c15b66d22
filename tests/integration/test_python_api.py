"""The Python API (`import netemu`) on real clusters (names hi-*, hk-* for links): up as a
context manager that always tears down, exec results, apply/get/delete,
capture, trace, link settings, and attaching to a running cluster by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

import netemu
from tests.integration.clusters import assert_gone, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


def pod(name: str, node: str, labels: dict | None = None, containers=("c",)) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {"pod": name}},
            "spec": {"nodeName": node, "containers": [
                {"name": c, "image": "nginx", "ports": [{"containerPort": 80 + i}]}
                for i, c in enumerate(containers)]}}


def service(name: str, selector: dict, type_: str = "ClusterIP") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": type_, "selector": selector, "ports": [{"port": 80, "targetPort": 80}]}}


@pytest.fixture(scope="module")
def lab():
    name = unique("hipy")
    topology = {"name": name, "nodes": [{"name": "a"}, {"name": "b"}],
                "workloads": [pod("web", "a", containers=("c", "second")), pod("peer", "b")]}
    try:
        with netemu.up(topology) as cluster:
            yield cluster
    finally:
        assert_gone(name)


# -- up and down -------------------------------------------------------------------------

def test_up_as_a_context_manager_tears_down_when_the_body_raises():
    name = unique("hiraise")
    with pytest.raises(RuntimeError, match="the experiment failed"):
        with netemu.up({"name": name, "nodes": [{"name": "a"}]}) as cluster:
            assert cluster.running and cluster.name == name
            assert name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            raise RuntimeError("the experiment failed")
    assert_gone(name)


def test_up_as_a_context_manager_tears_down_on_sigterm(tmp_path):
    """A script ended by SIGTERM (`timeout 60 python lab.py`) leaves nothing."""
    name = unique("hiterm")
    script = tmp_path / "lab.py"
    script.write_text(textwrap.dedent(f"""\
        import sys, time, netemu
        with netemu.up({{"name": "{name}", "nodes": [{{"name": "a"}}]}}) as cluster:
            print("ready", flush=True)
            time.sleep(120)
        """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert netemu.Cluster(name).running
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            netemu.Cluster(name).down()
    assert proc.returncode != 0
    assert "SIGTERM" in proc.stderr.read()
    assert_gone(name)


def test_up_from_a_topology_file_with_overrides(tmp_path):
    name = unique("hifile")
    path = tmp_path / "t.yaml"
    path.write_text("name: ignored\nnodes: [{name: a}]\n")
    with netemu.up(path, name=name, backend="host-gw") as cluster:
        assert cluster.name == name and sorted(cluster.nodes) == ["a"]
        assert netemu.Cluster(name).running
    assert_gone(name)


def test_a_bad_topology_dict_is_refused_before_anything_is_built():
    name = unique("hibad")
    with pytest.raises(netemu.TopologyError, match=r"^<dict>: nodes\[1\]\.name: duplicate node name \"a\""):
        netemu.up({"name": name, "nodes": [{"name": "a"}, {"name": "a"}]})
    assert_gone(name)


# -- exec -------------------------------------------------------------------------------------

def test_exec_in_a_pod_returns_output_and_exit_status(lab):
    r = lab.exec("web", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.returncode, r.ok) == ("out\n", "err\n", 3, False)
    assert r.args == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert lab.exec("web", "hostname").stdout.strip() == "web"          # a string runs with sh -c
    with pytest.raises(subprocess.CalledProcessError):
        lab.exec("web", ["false"], check=True)
    r = lab.exec("pod/web", ["cat"], input="to stdin")
    assert r.stdout == "to stdin" and r.ok


def test_exec_retries_while_the_command_fails(lab, tmp_path):
    flag = tmp_path / "flag"
    threading.Timer(0.6, flag.touch).start()
    started = time.monotonic()
    r = lab.exec("web", ["test", "-e", str(flag)], retry=10)
    assert r.ok and 0.5 < time.monotonic() - started < 5
    started = time.monotonic()
    r = lab.exec("web", ["false"], retry=1)
    assert r.returncode == 1 and 0.8 < time.monotonic() - started < 3


def test_exec_in_a_container_a_node_and_the_client(lab):
    assert lab.exec("web", "echo $NETEMU_CONTAINER", container="second").stdout == "second\n"
    assert lab.pods["web"].exec("echo $NETEMU_CONTAINER").stdout == "c\n"
    a = lab.nodes["a"]
    addrs = a.exec(["ip", "-4", "-o", "addr", "show", "eth0"]).stdout
    assert f" {a.address}/" in addrs
    assert lab.exec("node/b", ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout.count(lab.nodes["b"].address)
    # from outside the cluster to a node, and pod to pod across nodes
    assert lab.client.exec(["ping", "-c", "1", "-W", "2", a.address]).ok
    web = lab.pods["web"]
    assert web.node == "a" and lab.pods["peer"].node == "b"
    r = lab.pods["peer"].exec(["curl", "-s", "-m", "5", f"{web.ip}:80"])
    assert r.ok and "web" in r.stdout, r


def test_exec_errors_say_what_is_missing(lab):
    with pytest.raises(netemu.CliError, match='pods "nope" not found'):
        lab.exec("nope", ["true"])
    with pytest.raises(netemu.CliError, match="container nope is not valid for pod web"):
        lab.exec("web", ["true"], container="nope")
    with pytest.raises(KeyError):
        lab.nodes["nope"]
    with pytest.raises(KeyError):
        lab.pods["nope"]
    assert sorted(lab.pods) == ["peer", "web"] and sorted(lab.nodes) == ["a", "b"]


# -- objects -------------------------------------------------------------------------------------

def test_apply_get_delete(lab, tmp_path):
    stored = lab.apply(pod("extra", "b", labels={"app": "extra"}), service("extra-svc", {"app": "extra"}))
    assert [o["kind"] for o in stored] == ["Pod", "Service"]
    cluster_ip = stored[1]["spec"]["clusterIP"]
    assert lab.get("svc", "extra-svc")["spec"]["clusterIP"] == cluster_ip
    lab.wait()
    assert [p["metadata"]["name"] for p in lab.get("pods", selector="app=extra")] == ["extra"]
    # a pod reaches the new service's ClusterIP (its endpoints and rules take a moment)
    wait_for(lambda: lab.exec("web", ["curl", "-s", "-m", "2", f"{cluster_ip}:80"]).ok, timeout=30,
             interval=0.5, what="the service's rules")

    deleted = lab.delete("pod", "extra")
    assert [o["metadata"]["name"] for o in deleted] == ["extra"]
    with pytest.raises(netemu.ApiError, match='^pods "extra" not found$') as info:
        lab.get("pod", "extra")
    assert info.value.reason == "NotFound"
    with pytest.raises(netemu.ApiError, match='^services "nope" not found$'):
        lab.delete("svc", "nope")
    lab.delete(service("extra-svc", {}))                     # by the object, as delete -f
    assert "extra-svc" not in [s["metadata"]["name"] for s in lab.get("svc", namespace=None)]

    # A manifest file, as apply -f; and a bad object refuses the whole batch.
    manifest = tmp_path / "m.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: from-file}\n"
                        "spec: {selector: {pod: web}, ports: [{port: 80}]}\n")
    assert lab.apply(manifest)[0]["metadata"]["name"] == "from-file"
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "broken"}, "spec": {"containers": [{"name": "c"}]}}
    with pytest.raises(netemu.TopologyError, match=r"^<dict>: object 2 \(Pod broken\): "):
        lab.apply(service("never-stored", {"pod": "web"}), bad)
    assert not [s for s in lab.get("svc") if s["metadata"]["name"] == "never-stored"]
    lab.delete(manifest)
    assert "from-file" not in [s["metadata"]["name"] for s in lab.get("svc")]

    # Another namespace: the object's own, as kubectl takes it.
    other = pod("elsewhere", "a")
    other["metadata"]["namespace"] = "hi-other"
    lab.apply(other)
    assert lab.get("pod", "elsewhere", namespace="hi-other")["metadata"]["namespace"] == "hi-other"
    assert "hi-other/elsewhere" in list(lab.pods)
    lab.delete(other)
    assert [p["metadata"]["name"] for p in lab.get("pods", namespace="hi-other")] == []


# -- packets ---------------------------------------------------------------------------------------

def test_capturing_writes_a_pcap_with_the_packets(lab, tmp_path):
    from netemu.capture import decode

    path = tmp_path / "icmp.pcap"
    web_ip = lab.pods["web"].ip
    with lab.capturing("web", str(path), "icmp") as cap:
        assert lab.exec("peer", ["ping", "-c", "3", "-i", "0.2", "-W", "2", web_ip]).ok
    packets = [d for d in decode.decode_pcap(str(path))]
    assert len(packets) >= 6, packets                   # 3 requests, 3 replies
    assert cap.stats.get("captured", 0) >= 6


def test_capture_for_a_duration(lab, tmp_path):
    from netemu.capture import decode

    path = tmp_path / "node.pcap"
    peer_ip = lab.pods["peer"].ip
    pinger = threading.Thread(target=lambda: lab.exec("web", ["ping", "-c", "8", "-i", "0.25", peer_ip]))
    pinger.start()
    started = time.monotonic()
    lab.capture("node/a", str(path), duration=1.5)      # the node's uplink: encapsulated packets
    took = time.monotonic() - started
    pinger.join()
    assert 1.5 <= took < 10
    assert len(list(decode.read_pcap(str(path)))) > 0


def test_trace(lab):
    r = lab.trace("peer", "web", port=80)
    assert r.reached, str(r)
    text = str(r)
    assert text.startswith("trace peer -> ") and "pod web eth0" in text


# -- attaching -------------------------------------------------------------------------------------

def test_attach_to_a_running_cluster_by_name(lab):
    attached = netemu.Cluster(lab.name)
    assert sorted(attached.pods) == sorted(lab.pods)
    with attached:                 # not built by this object: leaving does not tear down
        assert attached.exec("web", "hostname").stdout == "web\n"
    assert lab.running
    # from another process, as a second script would
    code = (f"import netemu; c = netemu.Cluster({lab.name!r}); r = c.exec('peer', ['hostname']); "
            "print(r.stdout.strip(), r.returncode)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.stdout.split() == ["peer", "0"], out.stderr


# -- the example script ------------------------------------------------------------------------------

def test_example_script_reproduces_the_tutorials_four_traffic_kinds():
    name = unique("hiex")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "tutorial_traffic.py"), "--name", name],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=REPO))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    results = [line for line in out.splitlines() if "  ->  exit " in line]
    assert len(results) == 5 and all("->  exit 0: pod " in line for line in results), out
    assert "curl -s -m 5 localhost:8800  ->  exit 0: pod nginxpod, container nginx8800" in out
    assert "1. container to container over localhost" in out and "2. pod to pod across nodes" in out
    assert "3. pod to service ClusterIP" in out and "4. client to NodePort" in out
    assert "4. client to LoadBalancer external IP" in out
    # the cross-node request, seen encapsulated on the sending node's uplink
    assert "UDP/flannel  |  " in out and " TCP [S] " in out, out
    assert out.rstrip().endswith(f'cluster "{name}" removed; 5 of 5 worked')
    assert_gone(name)


def test_readme_example_runs(tmp_path):
    """The README's Python API example, run as printed (the cluster renamed hi-*)."""
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## Python API\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    name = unique("hirm")
    assert '"name": "lab"' in code
    script = tmp_path / "readme_example.py"
    script.write_text(code.replace('"name": "lab"', f'"name": "{name}"').replace("/tmp/web.pcap", str(tmp_path / "web.pcap")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("0 ") and "pod web" in proc.stdout, proc.stdout
    assert any(line.startswith("trace client -> ") for line in lines), proc.stdout
    from netemu.capture import decode
    seen = [d for d in decode.decode_pcap(str(tmp_path / "web.pcap")) if d.inner is not None]
    assert any(d.inner.dport == 80 for d in seen), seen
    assert_gone(name)


def test_up_from_another_thread(tmp_path):
    """Only the main thread may set signal handlers: up() elsewhere still works."""
    name = unique("hithr")
    seen = {}

    def body():
        try:
            with netemu.up({"name": name, "nodes": [{"name": "a"}]}) as cluster:
                seen["hostname"] = cluster.nodes["a"].exec("hostname").returncode
        except BaseException as e:      # noqa: BLE001 - reported to the test's thread
            seen["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(120)
    assert "error" not in seen, seen
    assert seen == {"hostname": 0}
    assert_gone(name)


def test_netemu_exec_on_the_command_line_is_unchanged(lab):
    """`netemu exec` shares pod_exec with the API: same container, same errors."""
    netemu_cli = [sys.executable, "-m", "netemu.cli"]
    out = subprocess.run(netemu_cli + ["exec", "web", "--cluster", lab.name, "-c", "second", "--",
                                       "sh", "-c", "echo $NETEMU_CONTAINER $HOSTNAME; exit 4"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert (out.returncode, out.stdout) == (4, "second web\n"), out.stderr
    out = subprocess.run(netemu_cli + ["exec", "web", "--cluster", lab.name, "-c", "nope", "--", "true"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 1
    assert out.stderr == ("netemu: error: container nope is not valid for pod web (containers: c, second)\n")


def test_logs_as_kubectl_logs(lab):
    talker = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "talker"},
              "spec": {"nodeName": "b", "containers": [{"name": "t", "image": "busybox",
                                                        "command": ["sh", "-c", "echo hello from talker; exec sleep 3600"]}]}}
    lab.apply(talker)
    lab.wait()
    try:
        wait_for(lambda: "hello from talker" in lab.logs("talker"), timeout=20, what="the container's output")
        assert lab.logs("talker", "t") == "hello from talker\n"
        # the command line reads the same file, through the same function
        out = subprocess.run([sys.executable, "-m", "netemu.cli", "logs", "talker", "--cluster", lab.name],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert (out.returncode, out.stdout) == (0, "hello from talker\n"), out.stderr
        with pytest.raises(netemu.CliError, match=r"^a container name must be specified for pod web, "
                                                  r"choose one of: \[c second\]$"):
            lab.logs("web")
        with pytest.raises(netemu.ApiError, match='previous terminated container "t" in pod "talker" not found'):
            lab.logs("talker", previous=True)
    finally:
        lab.delete("pod", "talker")


# -- links ---------------------------------------------------------------------------------------------

def _uplink_ends(cluster: str, node: str) -> list[tuple[str, str]]:
    from netemu import names
    return [(names.fabric_ns(cluster), names.fabric_port(node)), (names.node_ns(cluster, node), "eth0")]


def _kernel(cluster: str, node: str) -> dict:
    """What the kernel holds on both ends of NODE's uplink, read with tc and nft
    directly (not through netemu's own read-back, which the API returns)."""
    import json
    from netemu import netns
    out = {}
    for ns, dev in _uplink_ends(cluster, node):
        qdiscs = [q["kind"] for q in json.loads(netns.run(ns, ["tc", "-j", "qdisc", "show", "dev", dev]).stdout)
                  if q["kind"] != "noqueue"]
        table = netns.run(ns, ["nft", "list", "table", "netdev", f"netemu-link-{dev}"], check=False)
        out[f"{ns}/{dev}"] = (qdiscs, table.stdout if table.returncode == 0 else None)
    return out


def _rtt_min(lab, src: str, dst: str) -> float | None:
    r = lab.nodes[src].exec(["ping", "-c", "3", "-i", "0.2", "-W", "1", lab.nodes[dst].address])
    return float(r.stdout.rsplit("=", 1)[1].split("/")[0]) if r.ok else None


def test_links_from_the_topology_dict_and_set_at_run_time():
    """`link` keys of a topology dict are put on the kernel by up(); link()
    changes them as `netemu link set` does, links() reads them back as `netemu
    link show -o json`, and the command line sees what the API set."""
    from tests.integration.clusters import cli

    name = unique("hklink")
    topology = {"name": name, "cluster": {"link": {"loss": "1%"}},
                "nodes": [{"name": "a", "link": {"rate": "20mbit", "limit": 50}}, {"name": "b"}]}
    with netemu.up(topology) as lab:
        shown = lab.links()
        assert shown["a"]["settings"] == {"rate": "20mbit", "loss": "1%", "limit": "50"}
        assert shown["b"]["settings"] == {"loss": "1%"}
        assert shown["a"]["mechanisms"]["rate"].startswith("tc htb")
        for where, (qdiscs, table) in _kernel(name, "a").items():
            assert qdiscs == ["htb", "pfifo"] and "numgen random mod 1000000 < 10000" in table, where
            assert shown["a"]["installed"][where]["qdiscs"] == ["htb", "pfifo"]
        assert json.loads(cli("link", "show", "-o", "json", "--cluster", name).stdout) == shown
        assert lab.links("b") == {"b": shown["b"]}

        # A delay on b's uplink: each direction, so a's pings wait 2 x 10 ms.
        assert lab.link("b", delay="10ms") == {"loss": "1%", "delay": "10ms"}
        assert all(end["delayLine"] for end in lab.links("b")["b"]["installed"].values())
        rtt = wait_for(lambda: _rtt_min(lab, "a", "b"), timeout=10, what="a ping through 1% loss")
        assert rtt >= 20.0, rtt
        # saved with the cluster: the command line's link show sees it
        assert json.loads(cli("link", "show", "b", "-o", "json", "--cluster", name).stdout)["b"]["settings"] \
            == {"loss": "1%", "delay": "10ms"}

        # Numbers are taken as the flags take them; rate=0 removes the rate and its limit.
        assert lab.link("a", loss=100, rate=0) == {"loss": "100%"}
        assert _rtt_min(lab, "a", "b") is None and _rtt_min(lab, "b", "a") is None    # both directions
        for qdiscs, table in _kernel(name, "a").values():
            assert qdiscs == [] and "counter packets" in table

        assert lab.link("a", clear=True) == {} and lab.link("b", clear=True) == {}
        for node in ("a", "b"):
            assert all(k == ([], None) for k in _kernel(name, node).values()), _kernel(name, node)
            assert all(end == {"qdiscs": [], "nftables": [], "delayLine": None}
                       for end in lab.links(node)[node]["installed"].values())
        assert _rtt_min(lab, "a", "b") < 20.0
    assert_gone(name)


def test_link_errors_name_the_property_and_change_nothing():
    name = unique("hklinkerr")
    with netemu.up({"name": name, "nodes": [{"name": "a", "link": {"rate": "10mbit"}}]}) as lab:
        before = (_kernel(name, "a"), lab.links())
        with pytest.raises(netemu.ImpairmentError, match=r"^corrupt: not supported: this kernel has no netem"):
            lab.link("a", corrupt="1%", loss="1%")
        with pytest.raises(netemu.ImpairmentError, match=r"^rate: invalid rate 'fast': use a number and one of"):
            lab.link("a", rate="fast")
        with pytest.raises(netemu.ImpairmentError, match=r"^jitter: jitter needs a delay to spread$"):
            lab.link("a", jitter="1ms")
        with pytest.raises(netemu.ClusterError, match=r'^nodes "nope" not found$'):
            lab.link("nope", rate="1mbit")
        with pytest.raises(ValueError, match=r"^link a: clear=True takes no other property \(given: rate\)$"):
            lab.link("a", rate="1mbit", clear=True)
        with pytest.raises(ValueError, match=r"^link a: nothing to set"):
            lab.link("a")
        with pytest.raises(TypeError):
            lab.link("a", bandwidth="1mbit")          # not a property: Python's own error
        assert (_kernel(name, "a"), lab.links()) == before
    assert_gone(name)
