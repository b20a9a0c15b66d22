"""Start and stop an etcd server of our own: a temp data dir, loopback ports.

Used by the tests (tests/conftest.py: the etcd_server fixture) and meant for
`netemu up` when a cluster runs on etcd. The binary is Debian's etcd-server
(tools/install.sh installs it and keeps its system service stopped).
"""

from __future__ import annotations

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
