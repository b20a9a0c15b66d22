"""The node agent: makes the pods bound to one node real, and reports their status.

Like the kubelet, it watches the pods whose spec.nodeName is its node; for each it
builds a sandbox (netns + veth + IPAM address + pause), runs the containers as
processes inside it, restarts them per restartPolicy with Kubernetes' back-off,
probes readiness, publishes hostPorts, and writes status back to the store. A pod
marked for deletion is stopped, its sandbox removed, its address freed, and then
its object deleted. It also plays Docker's part for the node: it waits for the
overlay's subnet.env and configures docker0 from it.

All kubelets of a cluster run as tasks of the control-plane process; they never
switch that process's namespace (kernel work happens in worker threads that enter
and leave namespaces, or in child processes started through nsenter).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import subprocess

import trio

from netemu import names, netns
from netemu.images import plan as image_plan, write_site
from netemu.node import hostport, sandbox as sandboxes
from netemu.node.host import configure_bridge
from netemu.node.ipam import HostLocalIPAM
from netemu.overlay import subnetenv
from netemu.store import registry
from netemu.store.base import Conflict
from netemu.supervisor import stop as stop_process

log = logging.getLogger("netemu.kubelet")

BACKOFF_START = 10.0     # Kubernetes' container restart back-off: 10 s, doubling,
BACKOFF_MAX = 300.0      # capped at five minutes
PROBE_PERIOD = 0.5
STOP_GRACE = 5.0



MAX_PODS = "110"          # the kubelet's default --max-pods


def machine_capacity() -> dict:
    memory_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
                break
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{memory_kib}Ki", "pods": MAX_PODS}


def node_info() -> dict:
    uname = os.uname()
    return {"architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(uname.machine, uname.machine),
            "operatingSystem": "linux", "kernelVersion": uname.release, "osImage": "netemu",
            "containerRuntimeVersion": "netemu://", "kubeletVersion": "", "kubeProxyVersion": "",
            "machineID": "", "systemUUID": "", "bootID": ""}


LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION = 40       # seconds: the kubelet's default nodeLeaseDurationSeconds
LEASE_RENEW = 10.0        # a quarter of it, as the kubelet renews


def micro_time() -> str:
    """metav1.MicroTime: RFC 3339 with microseconds."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def renew_lease(store, node: str) -> None:
    def renew(lease: dict) -> None:
        lease.setdefault("spec", {}).update(holderIdentity=node, leaseDurationSeconds=LEASE_DURATION,
                                            renewTime=micro_time())

    if registry.mutate(store, "Lease", LEASE_NAMESPACE, node, renew) is not None:
        return
    owner = registry.get(store, "Node", None, node)
    if owner is None:
        return                  # the node was removed: no heartbeat for it
    lease = {"kind": "Lease", "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
             "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_DURATION,
                      "acquireTime": micro_time(), "renewTime": micro_time()}}
    lease["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node,
                                             "uid": owner["metadata"].get("uid")}]
    try:
        registry.create(store, lease)
    except Conflict:
        pass                    # created meanwhile: renewed next time

class Kubelet:
    def __init__(self, cluster: str, node: str, store, settings):
        self.cluster = cluster
        self.node = node
        self.store = store
        self.settings = settings
        self.node_ns = names.node_ns(cluster, node)
        self.node_dir = names.node_dir(cluster, node)
        self.workers: dict[str, PodWorker] = {}
        self.env: subnetenv.SubnetEnv | None = None
        self.ipam: HostLocalIPAM | None = None

    async def run(self) -> None:
        self.env = await self._wait_for_subnet_env()
        await trio.to_thread.run_sync(configure_bridge, self.node_ns, self.env)
        self.ipam = HostLocalIPAM(os.path.join(self.node_dir, "ipam"), self.env.subnet.network,
                                  self.env.subnet.ip)
        node = registry.get(self.store, "Node", None, self.node)
        self.address = node_address_of(node) if node else ""
        self._set_node_ready()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._renew_lease)
            since = self.store.revision()
            for pod in registry.list_(self.store, "Pod"):
                self._sync(pod["metadata"]["uid"], pod)
            # Then one pod at a time, from the watch: a change to one pod never
            # makes every kubelet re-read every pod.
            async for ev in self.store.watch(registry.prefix("Pod"), since):
                pod = ev.value
                uid = pod.get("metadata", {}).get("uid")
                if uid is None:
                    continue
                self._sync(uid, pod if ev.type == "PUT" else None)

    async def _renew_lease(self) -> None:
        """The node's heartbeat, as a kubelet keeps it: a Lease named after the
        node in kube-node-lease, renewed every LEASE_RENEW seconds (what
        `kubectl describe node` shows under Lease)."""
        while True:
            await trio.to_thread.run_sync(renew_lease, self.store, self.node)
            await trio.sleep(LEASE_RENEW)

    async def _wait_for_subnet_env(self) -> subnetenv.SubnetEnv:
        while True:
            env = subnetenv.read(self.node_dir)
            if env is not None:
                return env
            await trio.sleep(0.05)

    def node_address(self) -> str:
        return self.address

    def _set_node_ready(self) -> None:
        def change(node):
            status = node.setdefault("status", {})
            conds = [c for c in status.get("conditions", []) if c.get("type") != "Ready"]
            conds.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                          "message": "kubelet is posting ready status",
                          "lastTransitionTime": registry.now()})
            status["conditions"] = conds
            # What a kubelet reports about its machine: every node of a netemu
            # cluster shares this one, so each reports its CPUs and memory
            # (`kubectl describe node` computes its percentages from these).
            capacity = machine_capacity()
            status["capacity"] = capacity
            status["allocatable"] = dict(capacity)
            status["nodeInfo"] = node_info()
            node.setdefault("spec", {})["podCIDR"] = str(self.env.subnet.network)
        registry.mutate(self.store, "Node", None, self.node, change)

    def _sync(self, uid: str, pod: dict | None) -> None:
        """Start, update or stop the worker of one pod (POD None: the object is gone)."""
        worker = self.workers.get(uid)
        mine = pod is not None and pod.get("spec", {}).get("nodeName") == self.node
        if worker is None:
            if mine and not pod["metadata"].get("deletionTimestamp"):
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                self.nursery.start_soon(worker.run)
            return
        worker.update(pod if mine else None)


class ContainerState:
    def __init__(self, spec: dict):
        self.spec = spec
        self.name = spec["name"]
        self.restarts = 0
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.pid = 0
        self.ready = False
        self.done = False           # will not run again
        self.process: trio.Process | None = None


class PodWorker:
    def __init__(self, kubelet: Kubelet, pod: dict):
        self.k = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.ns = meta.get("namespace", "default")
        self.name = meta["name"]
        self.uid = meta["uid"]
        self.dir = names.pod_dir(kubelet.cluster, self.ns, self.name)
        self.containers = [ContainerState(c) for c in pod["spec"].get("containers", [])]
        self.sandbox: sandboxes.Sandbox | None = None
        self.stop = trio.Event()
        self.changed = trio.Event()
        self.last_status: dict | None = None
        self.start_time = registry.now()

    def update(self, pod: dict | None) -> None:
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            self.stop.set()
        else:
            self.pod = pod

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish_loop)
                if not await self._sandbox_with_retries(nursery):
                    nursery.cancel_scope.cancel()
                    return
                for c in self.containers:
                    nursery.start_soon(self._run_container, c)
                nursery.start_soon(self._probe_loop)
                await self.stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown()

    async def _sandbox_with_retries(self, nursery) -> bool:
        """Build the sandbox; on failure undo the partial one and retry with
        back-off, as the kubelet does. False if the pod was deleted meanwhile."""
        delay = 1.0
        while not self.stop.is_set():
            try:
                await self._start_sandbox(nursery)
                return True
            except Exception as e:
                log.exception("pod %s/%s: sandbox failed", self.ns, self.name)
                self._event("FailedCreatePodSandBox", f"Failed to create pod sandbox: {e}", "Warning")
                await self._remove_sandbox()
            with trio.move_on_after(delay):
                await self.stop.wait()
            delay = min(delay * 2, 30.0)
        return False

    async def _start_sandbox(self, nursery) -> None:
        k = self.k
        os.makedirs(self.dir, exist_ok=True)
        ip = k.ipam.allocate(self.uid)
        sb = sandboxes.Sandbox(namespace=names.pod_ns(k.cluster, self.ns, self.name),
                               veth=names.pod_veth(self.ns, self.name, self.uid), ip=str(ip),
                               gateway=str(k.env.subnet.ip), prefixlen=k.env.subnet.network.prefixlen,
                               mtu=k.env.mtu,
                               gso_max_segs=44 if k.settings.backend == "udp" else 0)
        self.sandbox = sb
        await trio.to_thread.run_sync(sandboxes.create_network, k.cluster, k.node, sb)
        pause = await trio.lowlevel.open_process(
            sandboxes.pause_argv(sb, self.name), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self._env(None),
            start_new_session=True)
        sb.pause_pid = pause.pid
        self.pause = pause
        nursery.start_soon(self._reap_pause, pause)
        # The UTS namespace exists once the pause process has exec'd sleep.
        await self._wait_for_pause(pause.pid)
        sb.save(self.dir)
        ports = hostport.mappings(self.pod, sb.ip)
        if ports:
            await trio.to_thread.run_sync(hostport.add, k.node_ns, self._key(), ports)
        self._event("Started", f"Started pod sandbox {sb.namespace} (pause pid {pause.pid})")
        self.changed.set()

    async def _wait_for_pause(self, pid: int) -> None:
        with trio.move_on_after(5):
            while True:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        if f.read().strip() == "sleep":
                            return
                except FileNotFoundError:
                    return
                await trio.sleep(0.005)

    async def _reap_pause(self, pause) -> None:
        await pause.wait()

    def _key(self) -> str:
        return f"{self.ns}/{self.name}"

    def _env(self, c: ContainerState | None) -> dict:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOSTNAME": self.name, names.CLUSTER_ENV: self.k.cluster,
               "NETEMU_POD": self._key()}
        if c is not None:
            env["NETEMU_CONTAINER"] = c.name
            for item in c.spec.get("env") or []:
                if "value" in item:
                    env[item["name"]] = str(item["value"])
        return env

    async def _run_container(self, c: ContainerState) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        cdir = os.path.join(self.dir, c.name)
        os.makedirs(cdir, exist_ok=True)
        p = image_plan(c.spec, self.name, cdir)
        write_site(p, self.name, c.name, self.k.node)
        if p.warning:
            self._event("ImageNotEmulated", p.warning, "Warning")
        backoff = BACKOFF_START
        log_path = os.path.join(self.dir, f"{c.name}.log")
        while True:
            started = registry.now()
            try:
                with open(log_path, "ab") as out:
                    proc = await trio.lowlevel.open_process(
                        netns.exec_argv(self.sandbox.namespace, p.argv, uts_pid=self.sandbox.pause_pid),
                        stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self._env(c),
                        cwd=c.spec.get("workingDir") or "/", start_new_session=True)
            except OSError as e:
                c.state = {"waiting": {"reason": "RunContainerError", "message": str(e)}}
                self.changed.set()
                code = 128
            else:
                c.process, c.pid = proc, proc.pid
                c.state = {"running": {"startedAt": started}}
                self._event("Started", f"Started container {c.name}")
                self.changed.set()
                try:
                    code = await proc.wait()
                finally:
                    if proc.returncode is None:
                        with trio.CancelScope(shield=True):
                            await _stop_process(proc)
                c.process, c.ready = None, False
                c.state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                          "startedAt": started, "finishedAt": registry.now(),
                                          "containerID": f"pid://{c.pid}"}}
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if not restart:
                c.done = True
                self.changed.set()
                return
            c.restarts += 1
            delay = backoff * self.k.settings.time_scale
            backoff = min(backoff * 2, BACKOFF_MAX)
            c.last_state = c.state
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off {delay:g}s restarting failed container={c.name}"}}
            self._event("BackOff", f"Back-off restarting failed container {c.name}", "Warning")
            self.changed.set()
            await trio.sleep(delay)

    async def _probe_loop(self) -> None:
        while True:
            changed = False
            for c in self.containers:
                ready = c.process is not None and c.process.returncode is None and \
                    await trio.to_thread.run_sync(self._ports_open, c)
                if ready != c.ready:
                    c.ready, changed = ready, True
            if changed:
                self.changed.set()
            await trio.sleep(PROBE_PERIOD)

    def _ports_open(self, c: ContainerState) -> bool:
        ports = [p["containerPort"] for p in c.spec.get("ports") or [] if p.get("protocol", "TCP") == "TCP"]
        if not ports:
            return True
        with netns.inside(self.k.node_ns):
            socks = [socket.socket() for _ in ports]
        try:
            for s, port in zip(socks, ports):
                s.settimeout(0.3)
                if s.connect_ex((self.sandbox.ip, port)) != 0:
                    return False
            return True
        finally:
            for s in socks:
                s.close()

    # -- status ---------------------------------------------------------------

    def status(self) -> dict:
        statuses = []
        for c in self.containers:
            # imageID: a real kubelet reports the image's digest; netemu runs no
            # images. The API always carries the field (not omitempty), and
            # typed clients (the Python kubernetes client) refuse a status without it.
            st = {"name": c.name, "image": c.spec.get("image", ""), "imageID": "", "ready": c.ready,
                  "restartCount": c.restarts, "state": c.state, "started": "running" in c.state}
            if c.pid:
                st["containerID"] = f"pid://{c.pid}"
            if getattr(c, "last_state", None):
                st["lastState"] = c.last_state
            statuses.append(st)
        phase = self._phase()
        all_ready = bool(self.containers) and all(c.ready for c in self.containers) and phase == "Running"
        status = {"phase": phase, "hostIP": self.k.node_address(), "startTime": self.start_time,
                  "conditions": [{"type": "PodScheduled", "status": "True"},
                                 {"type": "Initialized", "status": "True"},
                                 {"type": "ContainersReady", "status": str(all_ready)},
                                 {"type": "Ready", "status": str(all_ready)}],
                  "containerStatuses": statuses}
        if self.sandbox and self.sandbox.pause_pid:
            status["podIP"] = self.sandbox.ip
            status["podIPs"] = [{"ip": self.sandbox.ip}]
        return status

    def _phase(self) -> str:
        if self.sandbox is None or not self.sandbox.pause_pid:
            return "Pending"
        if any("running" in c.state for c in self.containers):
            return "Running"
        if self.containers and all(c.done for c in self.containers):
            codes = [c.state.get("terminated", {}).get("exitCode", 1) for c in self.containers]
            return "Succeeded" if all(code == 0 for code in codes) else "Failed"
        if any(c.restarts for c in self.containers):
            return "Running"
        return "Pending"

    async def _publish_loop(self) -> None:
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            status = self.status()
            if status != self.last_status:
                self.last_status = status
                self._write_status(status)
            await trio.sleep(0.02)

    def _write_status(self, status: dict) -> None:
        def change(pod):
            if pod["metadata"]["uid"] == self.uid:
                pod["status"] = status
        try:
            registry.mutate(self.k.store, "Pod", self.ns, self.name, change)
        except Exception:
            log.exception("pod %s: status update failed", self._key())

    def _event(self, reason: str, message: str, type_: str = "Normal") -> None:
        with contextlib.suppress(Exception):
            registry.record_event(self.k.store, self.pod, reason, message, type_=type_,
                                  source=f"kubelet, {self.k.node}")

    # -- teardown -------------------------------------------------------------

    async def _teardown(self) -> None:
        k = self.k
        for c in self.containers:
            if c.process is not None and c.process.returncode is None:
                await _stop_process(c.process)
        await self._remove_sandbox()
        k.ipam.release(self.uid)
        k.workers.pop(self.uid, None)
        # The object goes last, so whoever waits for it to vanish knows the pod is gone.
        current = registry.get(k.store, "Pod", self.ns, self.name)
        if current is not None and current["metadata"]["uid"] == self.uid \
                and current["metadata"].get("deletionTimestamp"):
            registry.delete(k.store, "Pod", self.ns, self.name)

    async def _remove_sandbox(self) -> None:
        k = self.k
        pause = getattr(self, "pause", None)
        if pause is not None and pause.returncode is None:
            await _stop_process(pause)
        self.pause = None
        with contextlib.suppress(Exception):
            await trio.to_thread.run_sync(hostport.remove, k.node_ns, self._key())
        if self.sandbox is not None:
            with contextlib.suppress(Exception):
                await trio.to_thread.run_sync(sandboxes.destroy_network, k.cluster, k.node, self.sandbox)
        self.sandbox = None


async def _stop_process(proc) -> None:
    """SIGTERM the container's process group, SIGKILL after the grace period."""
    await stop_process(proc, STOP_GRACE)


def node_address_of(node: dict) -> str:
    for a in node.get("status", {}).get("addresses", []):
        if a.get("type") == "InternalIP":
            return a["address"]
    return ""
