"""The kubelet's pure decisions, without root: what a container runs (command,
args, the image's entrypoint), which probes run with which timing and how their
results count, what cannot be started and why, how a process is told apart from
a recycled pid, kubectl's --force/--grace-period, and the DaemonSet controller's
view of a node being deleted."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import pytest
import trio

from netemu.controllers.daemonset import reconcile_daemonset
from netemu.images import plan
from netemu.node import probes, runtime
from netemu.topology.manifests import load_manifests
from netemu.workloads_cli import grace_period_of


# -- item 14: args go to the image's entrypoint ---------------------------------

KUBE_DNS_CONTAINERS = [
    {"name": "kubedns", "image": "gcr.io/google_containers/kubedns-amd64:1.8",
     "args": ["--domain=cluster.local.", "--dns-port=10053"]},
    {"name": "dnsmasq", "image": "gcr.io/google_containers/kube-dnsmasq-amd64:1.4",
     "args": ["--cache-size=1000", "--no-resolv", "--server=127.0.0.1#10053", "--log-facility=-"]},
    {"name": "healthz", "image": "gcr.io/google_containers/exechealthz-amd64:1.2",
     "args": ["--cmd=nslookup kubernetes.default.svc.cluster.local 127.0.0.1 >/dev/null", "--port=8080"]},
]


@pytest.mark.parametrize("container", KUBE_DNS_CONTAINERS, ids=lambda c: c["name"])
def test_args_of_an_image_not_emulated_never_become_the_program(container, tmp_path):
    p = plan(container, "kube-dns-v20-abcde", str(tmp_path))
    assert p.kind == "idle" and p.argv == ["sleep", "infinity"]
    assert container["args"][0] not in p.argv
    assert "not emulated" in p.warning and repr(container["args"]) in p.warning


def test_command_replaces_the_entrypoint_and_args_follow_it(tmp_path):
    p = plan({"image": "gcr.io/x/unknown:1", "command": ["sleep"], "args": ["5"]}, "p", str(tmp_path))
    assert p.argv == ["sleep", "5"] and p.kind == "command" and p.warning is None


def test_base_images_have_no_entrypoint_so_args_are_the_program(tmp_path):
    assert plan({"image": "busybox", "args": ["sleep", "9"]}, "p", str(tmp_path)).argv == ["sleep", "9"]
    assert plan({"image": "ubuntu:16.04"}, "p", str(tmp_path)).argv == ["bash"]


def test_web_images_args_starting_the_server_keep_the_stand_in_with_a_note(tmp_path):
    p = plan({"image": "nginx:1.25", "args": ["nginx", "-g", "daemon off;"],
              "ports": [{"containerPort": 8080}]}, "p", str(tmp_path))
    assert p.kind == "web" and p.ports == [8080] and "busybox" in p.argv[0]
    assert "-g daemon off;" in p.note


def test_web_images_other_args_are_what_the_entrypoint_execs(tmp_path):
    # nginx's docker-entrypoint.sh ends with exec "$@"
    p = plan({"image": "nginx", "args": ["sh", "-c", "echo hi"]}, "p", str(tmp_path))
    assert p.kind == "command" and p.argv == ["sh", "-c", "echo hi"]


# -- item 13: probes, only declared ones, Kubernetes' defaults and thresholds ----

def test_probe_defaults_are_kubernetes_ones():
    p = probes.parse("readinessProbe", {"tcpSocket": {"port": 80}}, {})
    assert (p.initial_delay, p.period, p.timeout, p.success_threshold, p.failure_threshold) == (0, 10, 1, 1, 3)
    assert p.action == "tcpSocket" and p.port == 80


def test_probe_named_port_http_and_exec():
    c = {"ports": [{"name": "http", "containerPort": 8080}]}
    p = probes.parse("livenessProbe", {"httpGet": {"port": "http", "path": "healthz"}, "periodSeconds": 2,
                                       "successThreshold": 5}, c)
    assert (p.port, p.path, p.period, p.success_threshold) == (8080, "/healthz", 2, 1)
    e = probes.parse("readinessProbe", {"exec": {"command": ["cat", "/ok"]}, "successThreshold": 2}, c)
    assert e.command == ("cat", "/ok") and e.success_threshold == 2
    with pytest.raises(ValueError, match="name of one of the container's ports"):
        probes.parse("readinessProbe", {"tcpSocket": {"port": "nope"}}, c)


def test_a_container_without_probes_has_none():
    found, problems = probes.probes_of({"name": "c", "ports": [{"containerPort": 80}]})
    assert found == {} and problems == []


def test_readiness_counts_successes_and_failures_in_a_row():
    c = probes.Counter(probes.parse("readinessProbe", {"exec": {"command": ["x"]}, "successThreshold": 2,
                                                       "failureThreshold": 2}, {}))
    assert c.result is False
    assert [c.add(True), c.add(False), c.add(True), c.add(True)] == [None, None, None, "up"]
    assert c.result is True
    assert [c.add(False), c.add(True), c.add(False), c.add(False)] == [None, None, None, "down"]
    assert c.result is False and c.add(False) is None


def test_liveness_starts_alive_and_fails_at_its_threshold():
    c = probes.Counter(probes.parse("livenessProbe", {"exec": {"command": ["x"]}, "failureThreshold": 3}, {}))
    assert c.result is True
    assert [c.add(False), c.add(False), c.add(False)] == [None, None, "down"]


def test_startup_probe_fails_once_at_its_threshold():
    c = probes.Counter(probes.parse("startupProbe", {"exec": {"command": ["x"]}, "failureThreshold": 2}, {}))
    assert [c.add(False), c.add(False), c.add(False)] == [None, "down", None]
    c = probes.Counter(c.probe)
    assert c.add(True) == "up"


def test_the_manifest_loader_keeps_probes(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec:
          containers:
          - name: c
            image: nginx
            readinessProbe:
              httpGet: {path: /, port: 80}
              periodSeconds: 2
            livenessProbe:
              exec: {command: [cat, /tmp/x]}
        """))
    objects, warnings = load_manifests(path)
    c = objects[0]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/", "port": 80}
    assert c["livenessProbe"]["exec"]["command"] == ["cat", "/tmp/x"]
    assert not [w for w in warnings if "Probe" in w], warnings


# -- item 4: what cannot be started, and why ---------------------------------------

@pytest.mark.parametrize("env,needle", [({"A=B": "x"}, "'A=B'"), ({"A": "x\0y"}, "NUL"), ({"": "x"}, "''")])
def test_env_execve_cannot_take_is_a_create_error(env, needle):
    with pytest.raises(runtime.CreateError, match=needle):
        runtime.check_exec(["sleep", "1"], env)


def test_nul_in_argv_is_a_create_error():
    with pytest.raises(runtime.CreateError, match="argument 1"):
        runtime.check_exec(["echo", "a\0b"], {})


def test_missing_program_is_a_run_error_in_runc_words():
    env = {"PATH": "/usr/bin:/bin"}
    with pytest.raises(runtime.StartError, match=r'exec: "no-such-prog-hd": executable file not found in \$PATH'):
        runtime.check_program(["no-such-prog-hd"], env, "/")
    with pytest.raises(runtime.StartError, match="stat /no/such: no such file or directory"):
        runtime.check_program(["/no/such"], env, "/")
    with pytest.raises(runtime.StartError, match="chdir to cwd"):
        runtime.check_program(["sleep"], env, "/no/such/dir")
    runtime.check_program(["sleep"], env, "/")


# -- adoption: a process is its pid AND its start time --------------------------------

def test_a_recycled_pid_is_not_the_process():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        ref = runtime.ref_of(proc.pid)
        assert runtime.alive(ref)
        assert not runtime.alive(runtime.ProcessRef(proc.pid, ref.start + 1))
    finally:
        proc.kill()
        proc.wait()
    assert not runtime.alive(ref)


def test_an_adopted_child_is_waited_for_with_its_exit_code():
    async def main():
        # Started without keeping a Process object, as after an in-process
        # kubelet restart: only the pid is known.
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "sleep 0.2; exit 3"], os.environ)
        handle = runtime.Handle(runtime.ref_of(pid))
        assert handle.running
        with trio.fail_after(5):
            assert await handle.wait() == 3
        assert not handle.running
    trio.run(main)


def test_signal_exit_codes_are_128_plus_the_signal():
    assert runtime.exit_code(-9) == 137 and runtime.exit_code(-15) == 143 and runtime.exit_code(2) == 2


# -- kubectl delete --force --grace-period ----------------------------------------------

def _args(**kw):
    base = dict(grace_period=-1, force=False, now=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_grace_period_as_kubectl_reads_it():
    assert grace_period_of(_args()) is None
    assert grace_period_of(_args(force=True)) == 0
    assert grace_period_of(_args(force=True, grace_period=0)) == 0
    assert grace_period_of(_args(grace_period=0)) == 1        # 0 without --force means 1
    assert grace_period_of(_args(now=True)) == 1
    assert grace_period_of(_args(grace_period=7)) == 7


# -- item 16: a node being deleted gets no daemon pod ---------------------------------------

def test_daemonset_gives_a_node_being_deleted_no_pod():
    from netemu.controllers import actions as act
    ds = {"kind": "DaemonSet", "apiVersion": "apps/v1",
          "metadata": {"name": "d", "namespace": "default", "uid": "u1"},
          "spec": {"selector": {"matchLabels": {"a": "b"}},
                   "template": {"metadata": {"labels": {"a": "b"}},
                                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
    nodes = [{"kind": "Node", "metadata": {"name": "n1"}, "spec": {"unschedulable": True}},
             {"kind": "Node", "metadata": {"name": "n2", "deletionTimestamp": "2026-01-01T00:00:00Z"},
              "spec": {"unschedulable": True}}]
    created = [a for a in reconcile_daemonset(ds, nodes, []) if isinstance(a, act.CreatePod)]
    assert [a.pod["spec"]["nodeName"] for a in created] == ["n1"]
