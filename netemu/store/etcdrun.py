"""Start and stop an etcd server of our own.

EtcdServer: a temp data dir, loopback ports, for the tests (tests/conftest.py:
the etcd_server fixture). start_owned/stop_owned: the etcd `netemu up` starts
on the first machine of a cluster over several machines when it is given no
--store, listening on that machine's address for the other machines. The
binary is Debian's etcd-server (tools/install.sh installs it and keeps its
system service stopped).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

ETCD = "etcd"


def etcd_binary() -> str | None:
    return shutil.which(ETCD)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member listening on HOST (clients on one free port, peers on
    another), its data in DATA_DIR. start() waits until it answers."""

    def __init__(self, data_dir: str, host: str = "127.0.0.1", name: str = "netemu"):
        self.data_dir = data_dir
        self.host = host
        self.name = name
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> "EtcdServer":
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("etcd: binary not found on PATH (tools/install.sh installs etcd-server)")
        os.makedirs(self.data_dir, exist_ok=True)
        peer = f"http://{self.host}:{self.peer_port}"
        self._log = open(os.path.join(self.data_dir, "etcd.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self._log.name}")
            try:
                with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                    if b"true" in r.read():
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd on {self.endpoint} not healthy after {timeout} s; see {self._log.name}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()


# -- the etcd a cluster over several machines runs on its first machine ----------

CLIENT_PORT = 2379          # etcd's own client port; another free one when it is taken
HEALTH_WAIT = 30.0          # seconds
STOP_WAIT = 10.0
# As kube-apiserver compacts etcd every 5 minutes (--etcd-compaction-interval),
# the cluster's own etcd compacts its history older than 5 minutes: watches
# from an older revision get Compacted and list again.
COMPACTION = ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m"]


class EtcdStartError(RuntimeError):
    """One line: why the cluster's etcd did not start."""


def owned_path(cluster: str) -> str:
    from netemu import names
    return os.path.join(names.state_dir(cluster), "etcd.json")


def owned_dir(cluster: str) -> str:
    from netemu import names
    return os.path.join(names.state_dir(cluster), "etcd")


def owned(cluster: str) -> dict | None:
    """The etcd CLUSTER started on this machine ({pid, start, endpoint, log}),
    None when it runs on an etcd of someone else's (or on SQLite)."""
    try:
        with open(owned_path(cluster)) as f:
            record = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _healthy(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1)
    try:
        conn.request("GET", "/health")
        return b"true" in conn.getresponse().read()
    except OSError:
        return False
    finally:
        conn.close()


def start_owned(cluster: str, host: str) -> str:
    """Start the etcd of CLUSTER on this machine: clients on HOST (the first
    machine's address, which the other machines reach) at CLIENT_PORT, or at a
    free port when something else holds that one; its one member's peer port on
    loopback; its data and log in the cluster's state folder. It runs in a
    session of its own, journalled, so that teardown (and clean after a crash)
    finds it, and it lives on when netemu's own processes die, as an etcd
    would. Returns its endpoint, etcd://HOST:PORT."""
    from netemu import journal

    binary = etcd_binary()
    if binary is None:
        raise EtcdStartError("etcd not found on PATH (tools/install.sh installs Debian's etcd-server); "
                             "or pass --store etcd://HOST:PORT, an etcd every machine reaches")
    port = CLIENT_PORT if _port_free(host, CLIENT_PORT) else free_port(host)
    peer = f"http://127.0.0.1:{free_port()}"
    client = f"http://{host}:{port}"
    folder = owned_dir(cluster)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "etcd.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "--name", cluster, "--data-dir", os.path.join(folder, "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{cluster}={peer}", "--initial-cluster-state", "new", *COMPACTION],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    journal.record_process(cluster, proc.pid)
    record = {"pid": proc.pid, "start": journal.process_start_time(proc.pid),
              "endpoint": f"etcd://{host}:{port}", "log": log_path}
    tmp = owned_path(cluster) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, owned_path(cluster))
    deadline = time.monotonic() + HEALTH_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EtcdStartError(f"etcd on {host}:{port} exited with {proc.returncode} at its start: "
                                 f"{_last_line(log_path)} (log: {log_path})")
        if _healthy(host, port):
            return record["endpoint"]
        time.sleep(0.05)
    raise EtcdStartError(f"etcd on {host}:{port} not healthy after {HEALTH_WAIT:.0f} s (log: {log_path})")


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def stop_owned(cluster: str) -> None:
    """Stop the etcd CLUSTER started here (SIGTERM, SIGKILL after STOP_WAIT);
    its data goes with the state folder. Not a process of ours any more (a
    re-used pid): left alone."""
    from netemu import journal

    record = owned(cluster)
    if record is None:
        return
    pid = record["pid"]
    if journal.process_start_time(pid) != record.get("start"):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while not _gone(pid, record.get("start")):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = math.inf
        time.sleep(0.05)


def _gone(pid: int, start: int | None) -> bool:
    """PID (started at START) has ended: reaped, a zombie (reaped here when
    it is our child: `up` rolling back the etcd it started), or its pid re-used."""
    from netemu import journal

    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return journal.process_start_time(pid) != start or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
