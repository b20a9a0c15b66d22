"""Throw-away clusters for integration tests: each has its own name, and is removed
even when the test fails."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import yaml

from netemu import cluster as clusters, names, netns
from netemu.topology.loader import load_topology

NETEMU = [sys.executable, "-m", "netemu.cli"]


def write_topology(tmp_path, name: str, body: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **body}, sort_keys=False))
    return str(path)


@contextlib.contextmanager
def running(path: str, **overrides):
    topo = load_topology(path, **overrides)
    try:
        summary = clusters.up(topo)
        yield topo.name, summary
    finally:
        clusters.teardown(topo.name, graceful=False)
        assert_gone(topo.name)


def assert_gone(name: str) -> None:
    # By exact parse of the name: "a-x-node-n1" is not cluster a's.
    left = [ns for ns in netns.list_all() if names.cluster_of(ns) == name]
    assert not left, f"namespaces left behind: {left}"
    assert not os.path.exists(names.state_dir(name)), "state folder left behind"
    assert not clusters.cluster_processes(name), "processes left behind"


def cli(*args: str, check: bool = True, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(NETEMU + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"netemu {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def lab(topology, **options):
    """A cluster built by the Python API (netemu.up: a topology dict, no YAML
    file; or a topology file's path, with NAME among OPTIONS to rename it),
    torn down by it when the block ends, and checked gone after, even when the
    block failed. Yields the netemu.Cluster."""
    import netemu

    name = options.get("name") or topology["name"]
    try:
        with netemu.up(topology, **options) as cluster:
            yield cluster
    finally:
        assert_gone(name)
