"""Shared fixtures: root checks, throw-away clusters, and the machine's own namespace
watched before and after the whole run."""

from __future__ import annotations

import json
import os
import subprocess

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (builds real network namespaces)")
    for item in items:
        if "root" in item.keywords or "integration" in str(item.fspath):
            item.add_marker(skip)


def root_snapshot() -> dict:
    """What the machine's own network namespace looks like (read-only)."""
    def run(*argv):
        return subprocess.run(argv, capture_output=True, text=True).stdout

    def links():
        data = json.loads(run("ip", "-j", "link", "show") or "[]")
        return sorted((l["ifname"], l.get("mtu"), tuple(l.get("flags", []))) for l in data)

    sysctls = {}
    for key in ("net/ipv4/ip_forward", "net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter",
                "net/ipv4/conf/all/route_localnet", "net/bridge/bridge-nf-call-iptables"):
        try:
            with open(f"/proc/sys/{key}") as f:
                sysctls[key] = f.read().strip()
        except FileNotFoundError:
            sysctls[key] = None
    return {
        "links": links(),
        "addrs": run("ip", "-o", "addr", "show"),
        "routes": run("ip", "route", "show", "table", "all"),
        "rules": run("ip", "rule", "show"),
        "nft": run("nft", "list", "ruleset"),
        "sysctls": sysctls,
    }


@pytest.fixture(scope="session", autouse=True)
def machine_namespace_untouched():
    """The whole suite must leave the machine's own namespace exactly as it was."""
    if os.geteuid() != 0:
        yield
        return
    before = root_snapshot()
    yield
    after = root_snapshot()
    for key in before:
        assert after[key] == before[key], f"the machine's own namespace changed: {key}"


@pytest.fixture(scope="session", autouse=True)
def kubeconfig_in_a_temp_file(tmp_path_factory):
    """`netemu up` adds a context to $KUBECONFIG (else ~/.kube/config): every test
    cluster's goes to a throw-away file, never to the user's own kubeconfig. The
    kubectl the tests run keeps its discovery cache there too (KUBECACHEDIR),
    not in ~/.kube/cache."""
    saved = {key: os.environ.get(key) for key in ("KUBECONFIG", "KUBECACHEDIR")}
    home = tmp_path_factory.mktemp("kube")
    os.environ["KUBECONFIG"] = str(home / "config")
    os.environ["KUBECACHEDIR"] = str(home / "cache")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _etcd(tmp_path_factory):
    """A real etcd: loopback, free ports, a temp data dir, stopped after.
    Skipped (with the reason) only where the etcd binary is absent;
    tools/install.sh installs it, so CI runs these."""
    from netemu.store.etcdrun import EtcdServer, etcd_binary

    if etcd_binary() is None:
        pytest.skip("etcd binary not found (tools/install.sh installs Debian's etcd-server)")
    server = EtcdServer(str(tmp_path_factory.mktemp("etcd")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_server(tmp_path_factory):
    """An etcd of this test's own (_etcd)."""
    yield from _etcd(tmp_path_factory)


@pytest.fixture(scope="module")
def etcd_server_module(tmp_path_factory):
    """An etcd the tests of one module share (_etcd)."""
    yield from _etcd(tmp_path_factory)
