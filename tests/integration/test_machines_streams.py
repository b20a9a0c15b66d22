"""exec, attach and port-forward of a pod on another machine (issue 15), on
machines simulated here (tests/integration/simmachines.py), as
test_machines.py's logs of a pod of another machine: web-2 runs on node n2 on
machine b; the API server and the commands run on machine a. kubectl (1.32:
WebSocket; 1.29: SPDY) through the API server, which relays the upgraded
connection to n2's kubelet port (10250); `netemu exec` and the Python API as
clients of that port from a node namespace of machine a. Machines hx<hex>-a,
-b; clusters hx-*."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from tests.integration.clusters import wait_for
from tests.integration.simmachines import machines_fixture

pytestmark = pytest.mark.timeout(400)

KUBECTL_1_29 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.29"      # SPDY/3.1 only, as kubectl up to 1.29


machines = machines_fixture("hx")


def topology(tmp_path, name: str) -> str:
    pod = lambda pname, node, **spec: {  # noqa: E731
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pname},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx", **spec}]}}
    body = {"name": name, "cluster": {"timeScale": 0.01},
            "machines": [{"name": "a", "address": "192.168.77.1"}, {"name": "b", "address": "192.168.77.2"}],
            "nodes": [{"name": "n1", "machine": "a"}, {"name": "n2", "machine": "b"}],
            "workloads": [pod("web-1", "n1"), pod("web-2", "n2"),
                          pod("ticker", "n2", image="busybox", command=[
                              "sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]),
                          pod("reader", "n2", image="busybox", stdin=True, command=[
                              "sh", "-c", "while read line; do echo got $line; done"])]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def up(machines, tmp_path, name: str):
    net, etcd = machines
    a, b = net.machines
    a.netemu("up", topology(tmp_path, name), "--store", etcd.endpoint, "-q")
    b.netemu("join", "--store", etcd.endpoint, "--machine", "b", "-q")
    kubectl = lambda *args, binary="kubectl", **kw: a.run(  # noqa: E731
        binary, "--cache-dir", str(tmp_path / f"cache-{os.path.basename(binary)}"), "--context", f"netemu-{name}",
        *args, **{"timeout": 60, **kw})
    wait_for(lambda: all(p["status"].get("phase") == "Running" and p["status"].get("podIP")
                         for p in json.loads(a.netemu("get", "pods", "-o", "json").stdout)["items"]),
             timeout=60, what="the pods Running")
    return a, b, kubectl


def down(machines, name: str) -> None:
    net, etcd = machines
    said = {}
    for m in reversed(net.machines):
        r = m.netemu("clean", name, check=False, timeout=120)
        said[m.name] = (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    for m in net.machines:
        left = [ns for ns in m.namespaces() if ns.startswith(name + "-")]
        assert not left, f"machine {m.name}: namespaces left: {left}; clean said {said[m.name]}"
    assert etcd.keys(f"/netemu/{name}/") == []


def test_exec_into_a_pod_on_another_machine(machines, tmp_path):
    """kubectl exec (WebSocket and SPDY; stdout, stderr, stdin, a terminal,
    the exit status), netemu exec and the Python API's exec on machine a, of
    web-2 on machine b: the command runs in web-2's namespaces on b."""
    name = "hx-exec"
    try:
        a, b, kubectl = up(machines, tmp_path, name)
        script = "echo out; echo err >&2; hostname; ip -4 -o addr show eth0 | wc -l; exit 3"
        web2_ip = json.loads(a.netemu("get", "pod", "web-2", "-o", "json").stdout)["status"]["podIP"]
        for binary in ("kubectl", KUBECTL_1_29):
            if not os.path.exists(binary) and binary != "kubectl":
                continue
            r = kubectl("exec", "web-2", "--", "sh", "-c", script, binary=binary, check=False)
            assert r.returncode == 3, (binary, r.stdout, r.stderr)
            assert r.stdout.splitlines() == ["out", "web-2", "1"], (binary, r.stdout)   # web-2's UTS namespace
            assert r.stderr.splitlines()[0] == "err", (binary, r.stderr)
            assert "command terminated with exit code 3" in r.stderr, (binary, r.stderr)
            r = kubectl("exec", "-i", "web-2", "--", "sh", "-c", "tr a-z A-Z; ip -4 -o addr show eth0",
                        binary=binary, input="hello from a\n")
            assert r.stdout.splitlines()[0] == "HELLO FROM A", (binary, r.stdout)
            assert f" {web2_ip}/" in r.stdout, (binary, r.stdout)                      # web-2's network namespace
            # without -i the command's stdin is empty at once
            assert kubectl("exec", "web-2", "--", "cat", binary=binary).stdout == ""
            # a terminal: -t needs one on kubectl's side, script(1) gives it one
            cmd = f"{binary} --cache-dir {tmp_path}/cache-tty --context netemu-{name} exec -it web-2 -- sh"
            r = a.run("script", "-qec", cmd, "/dev/null", input="tty\necho in $HOSTNAME\nexit 7\n", check=False,
                      timeout=60)
            assert r.returncode == 7, (binary, r.stdout, r.stderr)
            assert re.search(r"^(# )?/dev/pts/\d+\r?$", r.stdout, re.M), (binary, r.stdout)
            assert re.search(r"^(# )?in web-2\r?$", r.stdout, re.M), (binary, r.stdout)
            # the kubelet's refusals come back as they are
            r = kubectl("exec", "web-2", "-c", "nosuch", "--", "true", binary=binary, check=False)
            assert r.returncode == 1 and "container nosuch is not valid for pod web-2" in r.stderr, r.stderr
        # a few MB each way, whole and in order, through the relay and through netemu exec's client
        payload = base64.b64encode(os.urandom(1_500_000)).decode()
        digest = hashlib.sha256(payload.encode()).hexdigest()
        assert kubectl("exec", "-i", "web-2", "--", "sha256sum", input=payload).stdout.split()[0] == digest
        assert a.run(sys.executable, "-m", "netemu.cli", "exec", "web-2", "--", "sha256sum", input=payload,
                     timeout=60).stdout.split()[0] == digest
        zeros = "head -c 3000000 /dev/zero | tr '\\0' x"
        assert kubectl("exec", "web-2", "--", "sh", "-c", zeros).stdout == "x" * 3_000_000
        assert a.netemu("exec", "web-2", "--", "sh", "-c", zeros, timeout=60).stdout == "x" * 3_000_000
        # netemu exec on machine a: the command's own exit status, its output
        # on netemu's stdout and stderr, netemu's stdin its stdin
        r = a.netemu("exec", "web-2", "--", "sh", "-c", script, check=False, timeout=60)
        assert (r.returncode, r.stdout.splitlines(), r.stderr) == (3, ["out", "web-2", "1"], "err\n"), r
        r = a.run(sys.executable, "-m", "netemu.cli", "exec", "web-2", "--", "tr", "a-z", "A-Z", input="hi b\n",
                  timeout=60)
        assert r.stdout == "HI B\n"
        # a reader that goes away ends the command, as for a pod here
        marker = f"hx-{uuid.uuid4().hex[:8]}"
        r = a.run("sh", "-c", f"{sys.executable} -m netemu.cli exec web-2 -- yes {marker} | head -1", timeout=60)
        assert r.stdout == f"{marker}\n", r.stdout
        wait_for(lambda: b.run("pgrep", "-f", f"yes {marker}", check=False).returncode == 1, timeout=10,
                 what="yes stopped on machine b")
        r = a.netemu("exec", "web-2", "--", "sh", "-c", "exit 42", check=False, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (42, "", "")
        r = a.netemu("exec", "web-2", "--", "nosuch-command", check=False, timeout=60)
        assert r.returncode == 127, r                   # as sh says it: not found (nsenter's 127)
        # the same as b's own netemu exec, which runs it directly
        r = b.netemu("exec", "web-2", "--", "sh", "-c", script, check=False, timeout=60)
        assert (r.returncode, r.stdout.splitlines(), r.stderr) == (3, ["out", "web-2", "1"], "err\n"), r
        # a terminal on netemu's side: the command gets one too
        r = a.run("script", "-qec", f"{sys.executable} -m netemu.cli exec web-2 -- sh", "/dev/null",
                  input="tty\nexit 5\n", check=False, timeout=60)
        assert r.returncode == 5, (r.stdout, r.stderr)
        assert re.search(r"^(# )?/dev/pts/\d+\r?$", r.stdout, re.M), r.stdout
        r = a.netemu("exec", "web-2", "-c", "nosuch", "--", "true", check=False)
        assert r.returncode == 1 and "container nosuch is not valid for pod web-2" in r.stderr, r.stderr
        # the Python API's exec, on machine a
        r = a.run(sys.executable, "-c", f"import netemu; r = netemu.Cluster({name!r}).exec('web-2', "
                  "'read x; echo $x $HOSTNAME; exit 4', input='hey\\n'); print(r.returncode, repr(r.stdout))")
        assert r.stdout.strip() == "4 'hey web-2\\n'", r.stdout
        # n2's kubelet port serves its own node's pods only
        n2 = json.loads(a.netemu("get", "node", "n2", "-o", "json").stdout)
        n2_ip = next(x["address"] for x in n2["status"]["addresses"] if x["type"] == "InternalIP")
        probe = a.run("ip", "netns", "exec", f"{name}-node-n1", "curl", "-s", "-m", "5",
                      f"http://{n2_ip}:10250/exec/default/web-1/c?command=true")
        assert json.loads(probe.stdout)["reason"] == "NotFound", probe.stdout
        # machine b out of reach: an error naming the kubelet port it could not reach, in time
        net, _etcd = machines
        net.cut(b)
        try:
            started = time.monotonic()
            r = kubectl("exec", "web-2", "--", "true", check=False)
            assert r.returncode == 1 and f"error dialing backend: dial tcp {n2_ip}:10250" in r.stderr, r.stderr
            r = a.netemu("exec", "web-2", "--", "true", check=False, timeout=60)
            assert r.returncode == 1 and f"error dialing backend: dial tcp {n2_ip}:10250" in r.stderr, r.stderr
            assert time.monotonic() - started < 40
        finally:
            net.restore(b)
    finally:
        down(machines, name)


def test_port_forward_and_attach_to_a_pod_on_another_machine(machines, tmp_path):
    """kubectl port-forward (SPDY tunnelled in a WebSocket, and plain SPDY)
    and the Python client's port-forward, carrying HTTP requests to web-2
    on machine b; kubectl attach to a container on machine b shows its
    output as it comes, and attach -i gives it what is typed."""
    name = "hx-pf"
    try:
        a, b, kubectl = up(machines, tmp_path, name)
        for port, binary in ((18080, "kubectl"), (18081, KUBECTL_1_29)):
            if not os.path.exists(binary) and binary != "kubectl":
                continue
            forward = subprocess.Popen(a.argv([binary, "--cache-dir", str(tmp_path / "cache-pf"), "--context",
                                               f"netemu-{name}", "port-forward", "pod/web-2", f"{port}:80",
                                               f"{port + 100}:81"]),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert forward.stdout.readline().startswith(f"Forwarding from 127.0.0.1:{port} -> 80")
                for i in range(3):                      # several connections over one session
                    r = a.run("curl", "-s", "-m", "10", f"http://127.0.0.1:{port}/?{i}", timeout=30)
                    assert "pod web-2," in r.stdout, (binary, r.stdout)        # web-2 names itself
                # nothing listens on 81 in web-2: the kubelet's words, through kubectl
                a.run("curl", "-s", "-m", "10", f"http://127.0.0.1:{port + 100}/", check=False, timeout=30)
                time.sleep(0.5)
            finally:
                forward.terminate()
                _out, err = forward.communicate(timeout=20)
            assert "error forwarding port 81 to pod default/web-2: failed to connect to localhost:81 inside " \
                "namespace" in err and f"{name}-pod-web-2" in err and "connection refused" in err, (binary, err)
        # the Python client's port-forward: WebSocket v4.channel.k8s.io, the ports in the query
        r = a.run(sys.executable, "-c", f"""if True:
            from kubernetes import client, config
            from kubernetes.stream import portforward
            config.load_kube_config(context="netemu-{name}")
            pf = portforward(client.CoreV1Api().connect_get_namespaced_pod_portforward, "web-2", "default",
                             ports="80")
            sock = pf.socket(80)
            sock.setblocking(True)
            sock.settimeout(20)
            sock.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            sock.close()
            print(data.decode(), pf.error(80))""", timeout=60)
        assert r.stdout.startswith("HTTP/1.") and "pod web-2," in r.stdout, r.stdout
        assert r.stdout.rstrip().endswith("None"), r.stdout                 # no error on port 80
        for binary in ("kubectl", KUBECTL_1_29):
            if not os.path.exists(binary) and binary != "kubectl":
                continue
            attach = subprocess.Popen(a.argv([binary, "--cache-dir", str(tmp_path / "cache-attach"), "--context",
                                              f"netemu-{name}", "attach", "ticker"]),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                lines = []
                deadline = time.monotonic() + 30
                while len(lines) < 3 and time.monotonic() < deadline:
                    line = attach.stdout.readline()
                    if not line:
                        break
                    if line.startswith("tick "):
                        lines.append(int(line.split()[1]))
            finally:
                attach.terminate()
                _out, err = attach.communicate(timeout=20)
            assert len(lines) == 3 and lines == sorted(lines) and lines[-1] - lines[0] == 2, (binary, lines, err)
            # attach -i to a container with `stdin: true`: what is typed reaches it on machine b
            attach = subprocess.Popen(a.argv([binary, "--cache-dir", str(tmp_path / "cache-attach"), "--context",
                                              f"netemu-{name}", "attach", "-i", "reader"]),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            try:
                time.sleep(1)
                attach.stdin.write(f"hello {os.path.basename(binary)}\n")
                attach.stdin.flush()
                line = ""
                deadline = time.monotonic() + 20
                while not line.startswith("got ") and time.monotonic() < deadline:
                    line = attach.stdout.readline()
                    if not line:
                        break
            finally:
                attach.terminate()
                _out, err = attach.communicate(timeout=20)
            assert line == f"got hello {os.path.basename(binary)}\n", (binary, line, err)
    finally:
        down(machines, name)
