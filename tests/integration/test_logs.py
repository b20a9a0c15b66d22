"""netemu logs on a real cluster (names he-logs-*): a container that restarts
keeps its previous instance's log for `logs --previous`, and `logs` shows the
current instance only, as the kubelet keeps one log per instance."""

from __future__ import annotations

import re
import uuid

import pytest

import netemu
from tests.integration.clusters import assert_gone, cli, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture
def lab():
    name = f"he-logs-{uuid.uuid4().hex[:4]}"
    # Each instance prints a line naming itself (its start time in nanoseconds)
    # and exits 1; restartPolicy Always restarts it after the back-off.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crash"},
           "spec": {"nodeName": "n1", "restartPolicy": "Always", "containers": [
               {"name": "c", "image": "busybox",
                "command": ["sh", "-c", "echo instance $(date +%s%N); sleep 0.5; exit 1"]}]}}
    try:
        with netemu.up({"name": name, "cluster": {"timeScale": 0.05}, "nodes": [{"name": "n1"}],
                        "workloads": [pod]}) as cluster:
            yield cluster
    finally:
        assert_gone(name)


def test_logs_previous_is_the_instance_before_the_restart(lab):
    name = lab.name
    def restarts():
        out = cli("get", "pods", "crash", "--cluster", name).stdout.splitlines()[1].split()
        return int(out[3]) >= 2
    wait_for(restarts, timeout=60, interval=0.3, what="two restarts")
    def instances():
        previous = cli("logs", "crash", "-p", "--cluster", name).stdout
        current = cli("logs", "pod/crash", "--cluster", name).stdout
        both = [re.fullmatch(r"instance (\d+)\n", text) for text in (previous, current)]
        # one line each (one instance per log), the previous one started first;
        # a restart between the two reads shows as the wrong order: read again
        return all(both) and int(both[0].group(1)) < int(both[1].group(1)) and (previous, current)
    previous, current = wait_for(instances, timeout=30, interval=0.2, what="the two instances' logs")
    assert previous != current
    # A pod that never restarted has no previous instance: kubectl's error.
    r = cli("logs", "--previous", "nosuchpod", "--cluster", name, check=False)
    assert r.returncode == 1 and 'pods "nosuchpod" not found' in r.stderr
