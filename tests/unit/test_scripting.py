"""The Python API's parts that need no cluster: a cheap `import netemu`, the
lazy names, load()'s inputs, and the result object."""

from __future__ import annotations

import subprocess
import sys

import pytest

import netemu


def test_import_netemu_imports_no_submodule():
    # The CLI, the daemons and the fastudp workers import the package: the API's
    # imports must wait until a name of it is used.
    code = ("import sys, netemu; print(sorted(m for m in sys.modules if m.startswith('netemu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['netemu']"


def test_fastudp_worker_module_does_not_load_the_api():
    code = ("import sys, netemu.overlay.fastudp; "
            "print('netemu.scripting' in sys.modules, 'netemu.cli' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_lazy_names_resolve_and_unknown_names_do_not():
    from netemu import scripting
    from netemu.topology.model import TopologyError

    assert netemu.up is scripting.up and netemu.Cluster is scripting.Cluster
    assert netemu.TopologyError is TopologyError
    assert set(netemu.__all__) <= set(dir(netemu))
    with pytest.raises(AttributeError):
        netemu.no_such_name


def test_load_takes_a_dict_a_file_or_a_topology(tmp_path):
    topo = netemu.load({"name": "hilab", "nodes": [{"name": "a"}]})
    assert topo.name == "hilab" and topo.source is None
    path = tmp_path / "hifile.yaml"
    path.write_text("nodes: [{name: a}]\n")
    assert netemu.load(path).name == "hifile"
    assert netemu.load(str(path), name="hiother").name == "hiother"
    assert netemu.load(topo) is topo
    with pytest.raises(TypeError):
        netemu.load(42)


def test_load_errors_name_dict_and_field():
    with pytest.raises(netemu.TopologyError, match=r"^<dict>: nodes\[0\]\.name: "):
        netemu.load({"name": "hilab", "nodes": [{"name": "A_"}]})


def test_attaching_to_a_cluster_that_does_not_run_says_so():
    with pytest.raises(netemu.ClusterError, match='no cluster named "hi-not-running" is running'):
        netemu.Cluster("hi-not-running")


def test_exec_result_is_a_completed_process():
    r = netemu.ExecResult(["false"], 1, "", "oops")
    assert isinstance(r, subprocess.CompletedProcess)
    assert not r.ok and r.stderr == "oops"
    with pytest.raises(subprocess.CalledProcessError):
        r.check_returncode()


def test_benchmark_takes_a_link_checked_before_anything_runs(monkeypatch):
    from netemu.bench import runner

    for bad, message in (({"corrupt": "1%"}, r"^corrupt: not supported: "),
                         ({"delay": "soon"}, r"^delay: invalid duration 'soon'"),
                         ({"bandwidth": "1mbit"}, r"^bandwidth: unknown link property")):
        with pytest.raises(netemu.ImpairmentError, match=message):
            netemu.benchmark(["udp"], link=bad)
    # A good one reaches the runner's options as --link's would (the run itself
    # is the benchmark's business, not a unit test's).
    seen = []
    monkeypatch.setattr(runner, "run", lambda opts, **_: seen.append(opts) or {})
    netemu.benchmark(["udp"], link={"delay": "10ms", "loss": "0.1%"})
    assert seen[0].link == {"delay": "10ms", "loss": "0.1%"} and seen[0].backends == ["udp", "host-gw"]


def test_up_passes_kubeconfig_and_the_bench_builds_through_it_without_one(monkeypatch):
    """netemu.up(kubeconfig=False) reaches cluster.up (no context for a
    throw-away cluster); the benchmark's clusters are built by netemu.up with
    it (the build itself is the integration tests' business)."""
    from netemu import cluster as clusters
    from netemu.bench import runner

    calls = []
    monkeypatch.setattr(clusters, "require_root", lambda: None)
    monkeypatch.setattr(clusters, "up", lambda topo, progress, **kw: calls.append((topo.name, kw)))
    monkeypatch.setattr(clusters, "resolve", lambda name: name)     # nothing was built to attach to
    netemu.up({"name": "hkunit", "nodes": [{"name": "a"}]}, kubeconfig=False)
    netemu.up({"name": "hkunit2", "nodes": [{"name": "a"}]})
    assert [(name, kw["kubeconfig"]) for name, kw in calls] == [("hkunit", False), ("hkunit2", True)]

    built = []

    class Stop(Exception):
        pass

    def fake_up(topology, **kw):
        built.append((topology["name"], kw.get("kubeconfig")))
        raise Stop
    monkeypatch.setattr(netemu, "up", fake_up)
    with pytest.raises(Stop):
        runner.BenchCluster("hkb-udp", "udp", 1500).up()
    assert built == [("hkb-udp", False)]
