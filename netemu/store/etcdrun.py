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
        self._log = open(os.path.join(self.data_dir, "etcd.log"), "wb")
        self.proc = _spawn(binary, self.name, os.path.join(self.data_dir, "data"), self.endpoint,
                           f"http://{self.host}:{self.peer_port}", self._log)
        problem = _wait_healthy(self.proc, self.host, self.client_port, timeout)
        if problem:
            self.stop()
            raise RuntimeError(f"etcd on {self.endpoint} {problem}; see {self._log.name}")
        return self

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
        proc = _spawn(binary, cluster, os.path.join(folder, "data"), client, peer, log, COMPACTION)
    journal.record_process(cluster, proc.pid)
    record = {"pid": proc.pid, "start": journal.process_start_time(proc.pid),
              "endpoint": f"etcd://{host}:{port}", "log": log_path}
    tmp = owned_path(cluster) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, owned_path(cluster))
    problem = _wait_healthy(proc, host, port, HEALTH_WAIT)
    if problem is None:
        return record["endpoint"]
    if proc.poll() is not None:
        problem += f": {_last_line(log_path)}"
    raise EtcdStartError(f"etcd on {host}:{port} {problem} (log: {log_path})")


def _spawn(binary: str, name: str, data_dir: str, client: str, peer: str, log,
           extra: tuple[str, ...] | list[str] = ()) -> subprocess.Popen:
    """One etcd member alone in its cluster: clients at CLIENT, peers at PEER,
    output to LOG, in a session of its own."""
    return subprocess.Popen(
        [binary, "--name", name, "--data-dir", data_dir,
         "--listen-client-urls", client, "--advertise-client-urls", client,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"{name}={peer}", "--initial-cluster-state", "new", *extra],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_healthy(proc: subprocess.Popen, host: str, port: int, timeout: float) -> str | None:
    """None once etcd at HOST:PORT answers /health, else what went wrong:
    it exited, or it was not healthy within TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode} at its start"
        if _healthy(host, port):
            return None
        time.sleep(0.05)
    return f"not healthy after {timeout:.0f} s"


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
    return not journal.running(pid, start)
