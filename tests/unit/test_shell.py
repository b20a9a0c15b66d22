"""`netemu shell NODE [--cluster C] [-- COMMAND...]`: argument parsing and the
pure parts (what runs, where kubectl points, the environment). The namespaces
themselves are tested in tests/integration/test_shell.py."""

from __future__ import annotations

import pytest
import yaml

from netemu import cli, shell_cli


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(cli.clusters, "require_root", lambda: None)
    monkeypatch.setattr(shell_cli, "run_shell",
                        lambda cluster, node, command: seen.append((cluster, node, command)) or 0)
    return seen


@pytest.mark.parametrize("argv, wanted", [
    (["shell", "m1"], (None, "m1", [])),
    (["shell", "m1", "--cluster", "c1"], ("c1", "m1", [])),
    (["shell", "--cluster", "c1", "m1"], ("c1", "m1", [])),
    (["shell", "m1", "--", "hostname"], (None, "m1", ["hostname"])),
    # kubectl's order: everything after -- is the command, its own flags included
    (["shell", "m1", "--cluster", "c1", "--", "sh", "-c", "exit 7"], ("c1", "m1", ["sh", "-c", "exit 7"])),
    (["shell", "m1", "--", "kubectl", "get", "pods", "--cluster", "x", "-n", "kube-system"],
     (None, "m1", ["kubectl", "get", "pods", "--cluster", "x", "-n", "kube-system"])),
])
def test_arguments(calls, argv, wanted):
    assert cli.main(argv) == 0
    assert calls == [wanted]


def test_a_node_is_required(calls):
    with pytest.raises(SystemExit) as e:
        cli.main(["shell"])
    assert e.value.code == 2 and not calls


def test_an_unknown_flag_before_the_dashes_is_bad_usage(calls):
    with pytest.raises(SystemExit) as e:
        cli.main(["shell", "m1", "-x", "--", "true"])
    assert e.value.code == 2 and not calls


def test_the_status_of_the_command_is_the_exit_status(monkeypatch):
    monkeypatch.setattr(cli.clusters, "require_root", lambda: None)
    monkeypatch.setattr(shell_cli, "run_shell", lambda cluster, node, command: 7)
    assert cli.main(["shell", "m1", "--", "sh", "-c", "exit 7"]) == 7


def test_no_cluster_running_is_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(cli.clusters, "require_root", lambda: None)
    monkeypatch.setattr(cli.clusters, "running_clusters", lambda: [])
    assert cli.main(["shell", "m1", "--cluster", "hx-none", "--", "true"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == 'netemu: error: no cluster named "hx-none" is running'


def test_what_runs():
    assert shell_cli.shell_argv(["sh", "-c", "exit 7"], {"SHELL": "/bin/zsh"}) == ["sh", "-c", "exit 7"]
    assert shell_cli.shell_argv([], {"SHELL": "/bin/zsh"}) == ["/bin/zsh"]
    assert shell_cli.shell_argv([], {}) == ["/bin/bash"]
    assert shell_cli.shell_argv([], {"SHELL": ""}) == ["/bin/bash"]


def test_kubectl_talks_to_localhost_on_the_api_node_and_to_its_eth0_elsewhere():
    assert shell_cli.server_url("master", "master", "10.1.96.231") == "http://localhost:8080"
    assert shell_cli.server_url("node1", "master", "10.1.96.231") == "http://10.1.96.231:8080"
    # no address known (yet): the tutorial's default
    assert shell_cli.server_url("node1", "master", None) == "http://localhost:8080"


def test_the_shells_kubeconfig_names_only_that_server():
    data = yaml.safe_load(shell_cli.kubeconfig_text("hx1", "node1", "http://10.1.96.231:8080"))
    assert data["current-context"] == "netemu-hx1-node1"
    assert [c["cluster"]["server"] for c in data["clusters"]] == ["http://10.1.96.231:8080"]
    assert len(data["contexts"]) == 1 and data["contexts"][0]["context"]["cluster"] == "netemu-hx1-node1"


def test_the_environment_overrides_the_users_kubeconfig_and_keeps_the_rest():
    user = {"KUBECONFIG": "/root/.kube/prod", "PATH": "/usr/bin", "NETEMU_CLUSTER": "other"}
    env = shell_cli.shell_env(user, "hx1", "node1", "/run/netemu/hx1/shell/node1.kubeconfig", "/c")
    assert env["KUBECONFIG"] == "/run/netemu/hx1/shell/node1.kubeconfig"
    assert env["KUBECACHEDIR"] == "/c"
    assert env["NETEMU_CLUSTER"] == "hx1" and env["NETEMU_NODE"] == "node1" and env["HOSTNAME"] == "node1"
    assert env["PATH"] == "/usr/bin"
    assert user["KUBECONFIG"] == "/root/.kube/prod"        # the caller's mapping is left as it was
