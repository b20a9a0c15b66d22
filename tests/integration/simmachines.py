"""Machines simulated on this one: for the tests of a cluster over several
machines (issue 15).

A simulated machine is a network namespace of its own (its "own namespace":
what netemu takes for the machine's) and a mount namespace of its own in which
/run/netns and /run/netemu are empty tmpfs: its netemu sees only what it made,
as on a real machine, and names nothing another machine's netemu names. A
long-lived `sleep` holds both; every command "on the machine" joins them with
nsenter. Machines are linked by veth pairs standing in for their network (one
L2 segment, SimNetwork): the code path is the one real machines take, only the
link is simulated. Nothing is made in the test's own namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

NET = "192.168.77"          # the simulated machines' network (inside their namespaces only)


class SimMachine:
    def __init__(self, tag: str, name: str, index: int):
        self.name = name
        self.netns = f"{tag}-{name}"
        self.address = f"{NET}.{index}"
        self.holder: subprocess.Popen | None = None

    def start(self) -> "SimMachine":
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        # IPv4 only: no link-local address turning from tentative to valid
        # under a test that compares the machine's namespace before and after
        for key in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", self.netns, "sysctl", "-q", "-w",
                            f"net.ipv6.conf.{key}.disable_ipv6=1"], check=True)
        os.makedirs("/run/netemu", exist_ok=True)
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs tmpfs /run/netns && mount -t tmpfs tmpfs /run/netemu && echo ready "
             "&& exec sleep infinity"], stdout=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        assert line.strip() == "ready", f"machine {self.name}: its mount namespace did not come up"
        return self

    def argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 240, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(list(argv)), capture_output=True, text=True, timeout=timeout,
                              env=env, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"on machine {self.name}: {' '.join(argv)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def netemu(self, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
        """netemu of this checkout (as tests/integration/clusters.cli runs it)."""
        return self.run(sys.executable, "-m", "netemu.cli", *args, check=check, timeout=timeout)

    def namespaces(self) -> list[str]:
        return self.run("ip", "netns", "list").stdout.split()

    def processes(self) -> list[int]:
        """Processes in this machine's network namespace or in a namespace
        only this machine can see (their mount namespace is the holder's)."""
        mine = os.stat(f"/proc/{self.holder.pid}/ns/mnt").st_ino
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.holder.pid:
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{entry}/ns/mnt").st_ino == mine:
                        out.append(int(entry))
        return out

    def kill_all(self) -> None:
        """SIGKILL every process on the machine (its netemu, as a crash would
        end it); its namespaces stay, held by the machine."""
        for _ in range(20):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill whatever runs on the machine, then the machine (its mount
        namespace, and with it every namespace it named, goes with the holder)."""
        if self.holder is not None:
            self.kill_all()
            self.holder.kill()
            self.holder.wait()
            self.holder = None
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


class SimNetwork:
    """Machines A, B, ... on one simulated network: a bridge in a namespace of
    its own (the switch), one veth per machine, addresses NET.1, NET.2, ..."""

    def __init__(self, tag: str, names_: list[str], mtu: int = 1500):
        self.tag = tag
        self.switch = f"{tag}-switch"
        self.mtu = mtu
        self.machines = [SimMachine(tag, n, i + 1) for i, n in enumerate(names_)]

    def __enter__(self) -> "SimNetwork":
        try:
            subprocess.run(["ip", "netns", "add", self.switch], check=True)
            sw = ["ip", "-n", self.switch]
            subprocess.run(sw + ["link", "add", "sw", "type", "bridge"], check=True)
            subprocess.run(sw + ["link", "set", "sw", "up"], check=True)
            for m in self.machines:
                m.start()
                subprocess.run(["ip", "link", "add", "eth0", "netns", m.netns, "mtu", str(self.mtu), "type",
                                "veth", "peer", "name", f"p-{m.name}", "netns", self.switch, "mtu",
                                str(self.mtu)], check=True)
                subprocess.run(sw + ["link", "set", f"p-{m.name}", "master", "sw", "up"], check=True)
                subprocess.run(["ip", "-n", m.netns, "addr", "add", f"{m.address}/24", "dev", "eth0"], check=True)
                subprocess.run(["ip", "-n", m.netns, "link", "set", "eth0", "up"], check=True)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for m in self.machines:
            m.stop()
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)

    def cut(self, machine: SimMachine) -> None:
        subprocess.run(["ip", "-n", self.switch, "link", "set", f"p-{machine.name}", "down"], check=True)

    def restore(self, machine: SimMachine) -> None:
        subprocess.run(["ip", "-n", self.switch, "link", "set", f"p-{machine.name}", "up"], check=True)


class SimEtcd:
    """A real etcd on machine M, listening on its network address."""

    def __init__(self, machine: SimMachine, data_dir: str, port: int = 2379):
        self.machine, self.data_dir, self.port = machine, data_dir, port
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"etcd://{self.machine.address}:{self.port}"

    def start(self) -> "SimEtcd":
        url = f"http://{self.machine.address}:{self.port}"
        peer = "http://127.0.0.1:2380"
        os.makedirs(self.data_dir, exist_ok=True)
        log = open(os.path.join(self.data_dir, "etcd.log"), "wb")
        self.proc = subprocess.Popen(self.machine.argv(
            ["etcd", "--name", "sim", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"sim={peer}",
             "--initial-cluster-state", "new"]), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"etcd exited; see {log.name}"
            probe = self.machine.run("curl", "-s", "-m", "1", f"{url}/health", check=False)
            if '"true"' in probe.stdout:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"etcd on machine {self.machine.name} not healthy; see {log.name}")

    def keys(self, prefix: str) -> list[str]:
        """The keys under PREFIX (etcdctl, run on the etcd's machine)."""
        out = self.machine.run("env", "ETCDCTL_API=3", "etcdctl", "--endpoints",
                               f"http://{self.machine.address}:{self.port}", "get", "--prefix", "--keys-only",
                               prefix).stdout
        return [line for line in out.splitlines() if line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def machines_fixture(tag: str):
    """A module-scoped pytest fixture (assign it to `machines`): machines a and
    b on one simulated network, named TAG + four hex digits, and an etcd on a;
    yields (network, etcd). Skipped without root or etcd."""
    import uuid

    import pytest

    @pytest.fixture(scope="module")
    def machines(tmp_path_factory):
        if os.geteuid() != 0:
            pytest.skip("needs root")
        from netemu.store.etcdrun import etcd_binary
        if etcd_binary() is None:
            pytest.skip("etcd binary not found (tools/install.sh installs Debian's etcd-server)")
        with SimNetwork(f"{tag}{uuid.uuid4().hex[:4]}", ["a", "b"]) as net:
            etcd = SimEtcd(net.machines[0], str(tmp_path_factory.mktemp("etcd"))).start()
            try:
                yield net, etcd
            finally:
                etcd.stop()

    return machines
