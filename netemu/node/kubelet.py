"""The node agent: makes the pods bound to one node real, and reports their status.

Like the kubelet, it watches the pods whose spec.nodeName is its node; for each a
pod worker builds a sandbox (netns + veth + IPAM address + pause), runs the
containers as processes inside it, restarts them per restartPolicy with
Kubernetes' back-off, runs the probes the manifest declares, publishes hostPorts,
and writes status back to the store. A pod marked for deletion (or removed at
once by a forced delete) is stopped, its sandbox, address and folder removed,
and then its object deleted. It also plays Docker's part for the node: it waits
for the overlay's subnet.env and configures docker0 from it.

What the real kubelet guarantees, this one does too:
  - one pod never takes its node down: whatever goes wrong with a pod (a
    container that cannot be created or started, an error in the kubelet's own
    handling of it) is said in that pod's status and events, and retried with
    back-off, while every other pod carries on;
  - stopping the kubelet stops no container. A restarted kubelet (the control
    plane restarted, or its task) ADOPTS the sandboxes and containers that still
    run, from the records in each pod's folder (netemu.node.runtime): same
    namespace, same IP, same processes. Folders of pods that are gone are
    cleaned up when it starts (HandlePodCleanups);
  - a sandbox whose pause process died is noticed: SandboxChanged, its
    containers are killed, the sandbox is re-created and the containers
    restarted per restartPolicy.

A kubelet runs as a part of its node's agent (netemu.node.agent), a process that
lives in the node's namespace; it never switches that process's namespace
(kernel work in other namespaces happens in worker threads that enter and leave
them, or in child processes started through nsenter).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import subprocess

import trio

from netemu import names, netns
from netemu.link import keep_delay_lines
from netemu.images import plan as image_plan, write_site
from netemu.node import hostport, logstamps, probes as probing, runtime, sandbox as sandboxes
from netemu.node.host import configure_bridge
from netemu.node.ipam import HostLocalIPAM
from netemu.overlay import subnetenv
from netemu.store import registry

log = logging.getLogger("netemu.kubelet")

BACKOFF_START = 10.0     # Kubernetes' container restart back-off: 10 s, doubling,
BACKOFF_MAX = 300.0      # capped at five minutes
MIN_GRACE = 2.0          # the kubelet's minimumGracePeriodInSeconds
DEFAULT_GRACE = 30.0     # terminationGracePeriodSeconds' default
EVENT_EVERY = 10         # a failing probe's event: its first failure, then every 10th
STDIN_POLL = 0.1         # seconds between looks for a stdinOnce container's first attach



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


def node_text(node: str) -> str:
    """What the stored JSON of NODE's pods contains (compact, as the store
    writes it), and other nodes' pods do not: the stores' pre-filter."""
    return json.dumps({"nodeName": node}, separators=(",", ":"))[1:-1]


class Kubelet:
    def __init__(self, cluster: str, node: str, store, settings):
        self.cluster = cluster
        self.node = node
        self.store = store
        self.settings = settings
        self.node_ns = names.node_ns(cluster, node)
        self.node_dir = names.node_dir(cluster, node)
        self.pods_dir = os.path.join(names.state_dir(cluster), "pods")
        self.workers: dict[str, PodWorker] = {}
        self.by_key: dict[str, PodWorker] = {}     # "ns/name" -> its newest worker
        self.env: subnetenv.SubnetEnv | None = None
        self.ipam: HostLocalIPAM | None = None
        self.log_stamper: logstamps.LogStamper | None = None

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
            self.log_stamper = logstamps.LogStamper()
            nursery.start_soon(self.log_stamper.run)
            since = self.store.revision()
            pods = self._pods_here()
            try:
                await trio.to_thread.run_sync(self._clean_up_orphans, pods)
            except Exception:
                log.exception("node %s: clean-up of orphaned pods failed", self.node)
            for pod in pods:
                self._sync(pod["metadata"].get("uid"), pod)
            del pods                # this frame lives as long as the kubelet
            # Then one pod at a time, from the watch: a change to one pod never
            # makes every kubelet re-read every pod.
            async for ev in self._watch_pods(since):
                pod = ev.value if isinstance(ev.value, dict) else {}
                uid = pod.get("metadata", {}).get("uid")
                if uid is None:
                    continue
                self._sync(uid, pod if ev.type == "PUT" else None)

    def _pods_here(self) -> list[dict]:
        """This node's pods. Where the store can, the other nodes' pods are
        neither read whole nor decoded: at 100 nodes, 1,000 decoded pods were
        5.6 MB of each agent, kept by the frame of run."""
        return [p for p in registry.list_containing(self.store, "Pod", node_text(self.node))
                if (p.get("spec") or {}).get("nodeName") == self.node]

    def _watch_pods(self, since: int):
        """The watch of the pods: only this node's when the store can filter
        before decoding (a pod's spec.nodeName never changes once set, and a
        deletion carries the last value), so that at bring-up a kubelet does
        not decode every other node's pod status writes; every pod otherwise
        (_sync tells them apart)."""
        watch_containing = getattr(self.store, "watch_containing", None)
        if watch_containing is None:
            return self.store.watch(registry.prefix("Pod"), since)
        return watch_containing(registry.prefix("Pod"), since, node_text(self.node))

    def stamp_log(self, pod_dir: str, container: str):
        """Start recording when the lines of a running container's log are
        written (logstamps.py)."""
        if self.log_stamper is None:
            return None             # not running (a test's kubelet)
        return self.log_stamper.add(names.container_log(pod_dir, container),
                                    names.container_log_times(pod_dir, container))

    def unstamp_log(self, stamp) -> None:
        if self.log_stamper is not None:
            self.log_stamper.remove(stamp)

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

    def _sync(self, uid: str | None, pod: dict | None) -> None:
        """Start, update or stop the worker of one pod (POD None: the object is gone).
        Never raises: a pod the kubelet cannot even read is logged and skipped."""
        try:
            worker = self.workers.get(uid)
            mine = pod is not None and (pod.get("spec") or {}).get("nodeName") == self.node
            if worker is None:
                if mine and uid:
                    # Also for a pod already marked for deletion: a kubelet that
                    # restarts meanwhile still has to stop it and delete it.
                    worker = PodWorker(self, pod)
                    worker.previous = self.by_key.get(worker.key)
                    self.workers[uid] = worker
                    self.by_key[worker.key] = worker
                    worker.update(pod)
                    self.nursery.start_soon(worker.run)
                return
            worker.update(pod if mine else None)
        except Exception:
            log.exception("node %s: pod %s: cannot be handled", self.node, uid)

    def _clean_up_orphans(self, pods: list[dict]) -> None:
        """Remove what pods of this node that no longer exist left behind (their
        processes, sandbox, hostPorts, address, folder): pods deleted while no
        kubelet ran, or force-deleted before their clean-up finished. PODS:
        this node's pods.

        The pod folders are the cluster's, <namespace>_<name>: the folder of
        another node's pod is that node's kubelet's, and is not opened here
        (100 kubelets reading every folder's sandbox record at their start
        were N^2 of bring-up). The folders are listed first, then the
        cluster's pods: a folder is made for a pod that exists, so one whose
        pod is not in the later list is an orphan, never a pod just made."""
        live = {p["metadata"].get("uid") for p in pods}
        mine = {names.pod_folder(p["metadata"].get("namespace"), p["metadata"].get("name")) for p in pods}
        try:
            folders = os.listdir(self.pods_dir)
        except FileNotFoundError:
            folders = []
        keys = {names.pod_folder(ns, name) for ns, name in registry.names_(self.store, "Pod")}
        for folder in folders:
            if folder in keys and folder not in mine:
                continue                # another node's pod
            path = os.path.join(self.pods_dir, folder)
            sb = sandboxes.Sandbox.load(path)
            if sb is None:
                # A folder that never got a sandbox record (an older netemu's, or
                # a pod whose sandbox never started) goes with its pod.
                if folder not in keys and os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                continue
            if sb.node == self.node and sb.uid not in live:
                log.info("node %s: cleaning up orphaned pod folder %s", self.node, folder)
                clean_up_folder(self, path, sb)
        for ip, owner in self.ipam.allocations().items():
            if owner not in live:
                self.ipam.release(owner)


def clean_up_folder(k: Kubelet, path: str, sb: sandboxes.Sandbox) -> None:
    """Tear down what a pod folder records, then the folder (blocking). Only what
    the records name as this cluster's and still alive is touched."""
    for rec in runtime.load_records(path).values():
        if isinstance(rec, dict) and rec.get("pid"):
            runtime.kill_now(runtime.ProcessRef(int(rec["pid"]), int(rec.get("start") or 0)))
    if sb.pause_pid:
        runtime.kill_now(runtime.ProcessRef(sb.pause_pid, sb.pause_start))
    ns_, _, name = os.path.basename(path).partition("_")
    with contextlib.suppress(Exception):
        hostport.remove(k.node_ns, f"{ns_}/{name}")
    with contextlib.suppress(Exception):
        sandboxes.destroy_network(k.cluster, k.node, sb)
    if sb.uid:
        k.ipam.release(sb.uid)
    shutil.rmtree(path, ignore_errors=True)


class ContainerState:
    def __init__(self, spec: dict):
        self.spec = spec
        self.name = str(spec.get("name", ""))
        self.restarts = 0
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict | None = None
        self.handle: runtime.Handle | None = None
        self.started_at = ""
        self.done = False           # will not run again
        self.announced = False      # its image's events were recorded
        self.plan = None
        self.probes: dict[str, probing.Probe] = {}
        self.started = False        # startupProbe passed (or none)
        self.probe_ready: bool | None = None   # readinessProbe's verdict (None: no probe)
        self.adopted_ready = False  # the readiness published before a kubelet restart
        self.stdin_keeper: int | None = None   # a stdinOnce container's write end (_open_stdin)
        self.log_stamp = None       # the running instance's log times (Kubelet.stamp_log)

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def ready(self) -> bool:
        if not self.running or not self.started:
            return False
        return True if self.probe_ready is None else self.probe_ready

    def record(self) -> dict:
        rec = {"restarts": self.restarts, "state": self.state, "lastState": self.last_state,
               "done": self.done, "startedAt": self.started_at}
        if self.handle is not None:
            rec.update(pid=self.handle.ref.pid, start=self.handle.ref.start)
        return rec



def _ready_status(status: dict | None) -> str | None:
    """The status of STATUS's Ready condition (None: no such condition)."""
    return next((c.get("status") for c in (status or {}).get("conditions") or [] if c.get("type") == "Ready"),
                None)

class PodWorker:
    def __init__(self, kubelet: Kubelet, pod: dict):
        self.k = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.ns = meta.get("namespace", "default")
        self.name = meta["name"]
        self.uid = meta["uid"]
        self.key = f"{self.ns}/{self.name}"
        self.dir = names.pod_dir(kubelet.cluster, self.ns, self.name)
        self.containers = [ContainerState(c) for c in (pod.get("spec") or {}).get("containers") or []
                           if isinstance(c, dict)]
        self.policy = (pod.get("spec") or {}).get("restartPolicy", "Always")
        self.sandbox: sandboxes.Sandbox | None = None
        self.pause: runtime.Handle | None = None
        self.adopted = False
        self.previous: PodWorker | None = None
        self.finished = trio.Event()
        self.stop = trio.Event()
        self.vanished = False        # the object is gone (a forced delete)
        self.changed = trio.Event()
        self.last_status: tuple | None = None
        self.start_time = (pod.get("status") or {}).get("startTime") or registry.now()

    def update(self, pod: dict | None) -> None:
        if pod is None:
            self.vanished = True
            self.stop.set()
        elif pod["metadata"].get("deletionTimestamp"):
            self.pod = pod
            self.stop.set()
        else:
            self.pod = pod
        if pod is not None and self.last_status is not None and (
                (pod["metadata"].get("annotations") or {}).get(sandboxes.ANNOTATION) != self.last_status[1]
                or _ready_status(pod.get("status")) != _ready_status(self.last_status[0])):
            # Someone else changed what this kubelet publishes (the node
            # lifecycle controller marks pods not ready when it thinks the node
            # lost): say it again, as the kubelet's status manager reconciles.
            self.last_status = None
            self.changed.set()

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        try:
            # A pod of the same name whose clean-up is not over (a forced
            # delete) still owns the folder, the namespace name and the
            # hostPort chain: wait for it.
            if self.previous is not None:
                await self.previous.finished.wait()
            if not self.stop.is_set():
                await self._live()
            # Reached only when the pod is deleted. When the kubelet itself is
            # stopped (cancelled), the pod's processes keep running, as
            # containers do when a kubelet stops; the next kubelet adopts them.
            with trio.CancelScope(shield=True):
                await self._teardown()
        except Exception:
            # Never the node's problem: the next event about this pod starts a
            # new worker, which adopts what this one left.
            log.exception("pod %s: worker failed", self.key)
        finally:
            self.finished.set()
            if self.k.workers.get(self.uid) is self:
                del self.k.workers[self.uid]
            if self.k.by_key.get(self.key) is self:
                del self.k.by_key[self.key]

    async def _live(self) -> None:
        """Keep the pod running until it is deleted."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._main)
            await self.stop.wait()
            nursery.cancel_scope.cancel()

    async def _main(self) -> None:
        """The pod's lifecycle, restarted with back-off on any error of the
        kubelet's own: the error is this pod's, in its events, never the node's."""
        delay = 1.0
        while True:
            try:
                await self._lifecycle()
                return
            except Exception as e:
                log.exception("pod %s: sync failed", self.key)
                self._event("FailedSync", f"error syncing pod, retrying in {delay:g}s: {e}", "Warning")
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _lifecycle(self) -> None:
        await trio.to_thread.run_sync(self._adopt)
        self.changed.set()
        while True:
            if self.pause is None or not self.pause.running:
                if self.sandbox is not None:
                    # The pause died (now, or while no kubelet watched).
                    if self.sandbox.pause_pid:
                        self._event("SandboxChanged", "Pod sandbox changed, it will be killed and re-created.")
                    await self._kill_containers()
                    await self._remove_sandbox()
                    self.changed.set()
                    if self._must_not_recreate():
                        await trio.sleep_forever()
                await self._sandbox_with_retries()
            async with trio.open_nursery() as nursery:
                for c in self.containers:
                    if not c.done:
                        nursery.start_soon(self._run_container, c)
                if self.sandbox is not None and self.sandbox.link.strip():
                    # The pod's delay lines, restarted should one die.
                    nursery.start_soon(keep_delay_lines, sandboxes.pod_link(self.k.cluster, self.k.node, self.sandbox),
                                       f"pod {self.key}'s link")
                await self.pause.wait()
                nursery.cancel_scope.cancel()
            self.changed.set()

    def _must_not_recreate(self) -> bool:
        """Kubernetes re-creates a dead sandbox unless the pod is over, or has
        restartPolicy Never and its containers have already run."""
        if self.containers and all(c.done for c in self.containers):
            return True
        return self.policy == "Never" and any(c.restarts or c.last_state or not c.state.get("waiting")
                                              or c.done for c in self.containers)

    def _adopt(self) -> None:
        """Take over what an earlier kubelet left running for this pod (blocking)."""
        if self.adopted:
            return
        self.adopted = True
        sb = sandboxes.Sandbox.load(self.dir)
        if sb is None:
            return
        if sb.uid != self.uid:
            # An earlier pod of the same name, never cleaned up.
            clean_up_folder(self.k, self.dir, sb)
            return
        self.sandbox = sb
        pause = runtime.ProcessRef(sb.pause_pid, sb.pause_start)
        if sb.pause_pid and runtime.alive(pause):
            self.pause = runtime.Handle(pause)
        records = runtime.load_records(self.dir)
        ready = {s.get("name"): s.get("ready") for s in (self.pod.get("status") or {}).get("containerStatuses") or []}
        for c in self.containers:
            rec = records.get(c.name)
            if not isinstance(rec, dict):
                continue
            c.restarts = int(rec.get("restarts") or 0)
            c.last_state = rec.get("lastState")
            c.done = bool(rec.get("done"))
            c.started_at = rec.get("startedAt") or ""
            c.state = rec.get("state") or c.state
            c.announced = True
            if rec.get("pid"):
                c.handle = runtime.Handle(runtime.ProcessRef(int(rec["pid"]), int(rec.get("start") or 0)))
                if c.handle.running:
                    log.info("pod %s: adopted container %s (pid %d)", self.key, c.name, c.handle.pid)
                    c.state = {"running": {"startedAt": c.started_at}}
                    c.started = True
                    # Keep the readiness the last kubelet published until the
                    # probes say otherwise: a restarted kubelet must not pull
                    # every pod out of its endpoints.
                    c.adopted_ready = bool(ready.get(c.name))
            elif "running" in c.state:
                c.state = {"waiting": {"reason": "ContainerCreating"}}

    async def _sandbox_with_retries(self) -> None:
        """Build the sandbox; on failure undo the partial one and retry with
        back-off, as the kubelet does."""
        delay = 1.0
        while True:
            try:
                await self._start_sandbox()
                return
            except Exception as e:
                log.exception("pod %s: sandbox failed", self.key)
                self._event("FailedCreatePodSandBox", f"Failed to create pod sandbox: {e}", "Warning")
                await self._remove_sandbox()
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _start_sandbox(self) -> None:
        k = self.k
        link = str(((self.pod.get("metadata") or {}).get("annotations") or {}).get(sandboxes.LINK_ANNOTATION)
                   or "")
        # The API server refuses a bad one on write; one stored without its
        # checks (an older netemu) is refused here before anything is built (no
        # address taken): the FailedCreatePodSandBox event names the annotation
        # and the problem, as a bad kubernetes.io/egress-bandwidth fails the CNI
        # bandwidth plugin.
        sandboxes.parse_link(link)
        os.makedirs(self.dir, exist_ok=True)
        ip = k.ipam.allocate(self.uid)
        sb = sandboxes.Sandbox(namespace=names.pod_ns(k.cluster, self.ns, self.name),
                               veth=names.pod_veth(self.ns, self.name, self.uid), ip=str(ip),
                               gateway=str(k.env.subnet.ip), prefixlen=k.env.subnet.network.prefixlen,
                               mtu=k.env.mtu,
                               gso_max_segs=44 if k.settings.backend == "udp" else 0,
                               uid=self.uid, node=k.node, link=link)
        # Recorded before anything is built, so that whatever is built can be
        # found and removed by a kubelet that restarts in the middle.
        sb.save(self.dir)
        self.sandbox = sb
        await trio.to_thread.run_sync(sandboxes.create_network, k.cluster, k.node, sb)
        proc = await trio.lowlevel.open_process(
            sandboxes.pause_argv(sb, self.name), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self._env(None),
            start_new_session=True)
        ref = runtime.ref_of(proc.pid) or runtime.ProcessRef(proc.pid, 0)
        self.pause = runtime.Handle(ref, proc)
        sb.pause_pid, sb.pause_start = ref.pid, ref.start
        sb.save(self.dir)
        # The UTS namespace exists once the pause process has its name (PAUSE_NAMES).
        await self._wait_for_pause(proc.pid)
        if not self.pause.running:
            raise RuntimeError("the pause process exited at once")
        ports = hostport.mappings(self.pod, sb.ip)
        if ports:
            await trio.to_thread.run_sync(hostport.add, k.node_ns, self.key, ports)
        self._event("Started", f"Started pod sandbox {sb.namespace} (pause pid {proc.pid})")
        self.changed.set()

    async def _wait_for_pause(self, pid: int) -> None:
        with trio.move_on_after(5):
            while True:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        if f.read().strip() in sandboxes.PAUSE_NAMES:
                            return
                except FileNotFoundError:
                    return
                await trio.sleep(0.005)

    def _env(self, c: ContainerState | None) -> dict:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOSTNAME": self.name, names.CLUSTER_ENV: self.k.cluster,
               "NETEMU_POD": self.key}
        if c is not None:
            env["NETEMU_CONTAINER"] = c.name
            for item in c.spec.get("env") or []:
                if isinstance(item, dict) and "value" in item:
                    env[str(item.get("name", ""))] = str(item["value"])
        return env

    def _grace(self) -> float:
        """How long a container gets between SIGTERM and SIGKILL."""
        if self.vanished:
            return MIN_GRACE
        meta, spec = self.pod.get("metadata") or {}, self.pod.get("spec") or {}
        value = meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE))
        try:
            return max(float(value), MIN_GRACE)
        except (TypeError, ValueError):
            return DEFAULT_GRACE

    def _save_records(self) -> None:
        with contextlib.suppress(OSError):
            runtime.save_records(self.dir, {c.name: c.record() for c in self.containers})

    # -- containers -----------------------------------------------------------

    def _plan(self, c: ContainerState):
        if c.plan is None:
            cdir = os.path.join(self.dir, c.name)
            os.makedirs(cdir, exist_ok=True)
            c.plan = image_plan(c.spec, self.name, cdir)
            c.probes, problems = probing.probes_of(c.spec)
            if c.plan.kind == "idle" and c.probes:
                # The idle stand-in cannot answer a probe meant for the real
                # image: running them would only kill it over and over.
                problems.append("the idle stand-in of an image netemu does not emulate is not probed")
                c.probes = {}
            c.plan.problems = problems
        write_site(c.plan, self.name, c.name, self.k.node)
        if not c.announced:
            c.announced = True
            if c.plan.warning:
                self._event("ImageNotEmulated", c.plan.warning, "Warning")
            if c.plan.note:
                self._event("ImageEmulated", c.plan.note)
            for problem in c.plan.problems:
                self._event("ProbeNotRun", f"container {c.name}: {problem}", "Warning")
        return c.plan

    async def _spawn(self, c: ContainerState) -> runtime.Handle:
        """Start C's process in the sandbox; CreateError / StartError / OSError."""
        try:
            p = await trio.to_thread.run_sync(self._plan, c)
        except Exception as e:
            # A spec the API server would have refused (a port without a
            # number, say): this container's error, said in its status.
            raise runtime.CreateError(f"cannot make a process of the container's spec: {e!r}") from e
        env = self._env(c)
        runtime.check_exec(p.argv, env)
        cwd = str(c.spec.get("workingDir") or "/")
        runtime.check_program(p.argv, env, cwd)
        sb = self.sandbox
        log_path = names.container_log(self.dir, c.name)
        if c.restarts:
            # One log per instance, as the kubelet keeps them: the one that
            # ended is what `logs --previous` reads (with its times).
            with contextlib.suppress(FileNotFoundError):
                os.replace(log_path, names.container_log(self.dir, c.name, previous=True))
            times = names.container_log_times(self.dir, c.name)
            with contextlib.suppress(FileNotFoundError):
                os.replace(times, names.container_log_times(self.dir, c.name, previous=True))
        stdin = self._open_stdin(c)
        try:
            with open(log_path, "ab") as out:
                # Watched before the process starts: a line it writes at once
                # gets its own time even when this kubelet is slow to come back
                # from the start.
                c.log_stamp = self.k.stamp_log(self.dir, c.name)
                proc = await trio.lowlevel.open_process(
                    netns.exec_argv(sb.namespace, p.argv, uts_pid=sb.pause_pid),
                    stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=out, stderr=out, env=env,
                    cwd=cwd, start_new_session=True)
        except BaseException:
            self.k.unstamp_log(c.log_stamp)
            c.log_stamp = None
            raise
        finally:
            if stdin is not None:
                os.close(stdin)
        return runtime.Handle(runtime.ref_of(proc.pid) or runtime.ProcessRef(proc.pid, 0), proc)

    def _open_stdin(self, c: ContainerState) -> int | None:
        """The stdin of a container with `stdin: true`: a FIFO in the pod's
        folder that `kubectl attach -i` writes (names.container_stdin). The
        container holds it open for writing too, so it never reads an end of
        input; with `stdinOnce` it does not: the kubelet holds the write end
        until the first attach has taken it (_release_stdin), and that
        attach's end is the container's end of input, as on a real node."""
        if not c.spec.get("stdin"):
            return None
        path = names.container_stdin(self.dir, c.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ".once")
        try:
            fifo = stat.S_ISFIFO(os.lstat(path).st_mode)
        except FileNotFoundError:
            fifo = None
        if not fifo:
            if fifo is False:
                os.unlink(path)              # not ours to read: make the FIFO anew
            os.mkfifo(path, 0o600)
        if not c.spec.get("stdinOnce"):
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        if c.stdin_keeper is not None:
            os.close(c.stdin_keeper)
        c.stdin_keeper = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return fd

    async def _release_stdin(self, c: ContainerState) -> None:
        """A stdinOnce container's write end, held until its first attach."""
        once = names.container_stdin(self.dir, c.name) + ".once"
        try:
            while c.stdin_keeper is not None and not os.path.exists(once):
                await trio.sleep(STDIN_POLL)
        finally:
            if c.stdin_keeper is not None:
                os.close(c.stdin_keeper)
                c.stdin_keeper = None

    async def _run_container(self, c: ContainerState) -> None:
        backoff = BACKOFF_START
        while True:
            if c.handle is None:
                try:
                    c.handle = await self._spawn(c)
                except (runtime.CreateError, runtime.StartError, OSError, ValueError) as e:
                    # ValueError: what execve's wrapper raises for what
                    # check_exec did not foresee; either way the pod says why.
                    create = isinstance(e, (runtime.CreateError, ValueError))
                    reason = "CreateContainerError" if create else "RunContainerError"
                    message = str(e)
                    self._event("Failed", f"Error: {message}", "Warning")
                    if not create and self.policy == "Never":
                        c.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message,
                                                  "startedAt": registry.now(), "finishedAt": registry.now()}}
                        c.done = True
                        self._save_records()
                        self.changed.set()
                        return
                    c.state = {"waiting": {"reason": reason, "message": message}}
                    self._save_records()
                    self.changed.set()
                    await trio.sleep(backoff * self.k.settings.time_scale)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                c.started_at = registry.now()
                c.state = {"running": {"startedAt": c.started_at}}
                c.started = "startupProbe" not in (c.probes or {})
                c.probe_ready = None if "readinessProbe" not in (c.probes or {}) else False
                self._save_records()
                self._event("Started", f"Started container {c.name}")
                self.changed.set()
            else:
                # Adopted: its probes start from where Kubernetes' do after a
                # kubelet restart, with the readiness last published.
                self._plan(c)
                c.started = True
                if "readinessProbe" in c.probes:
                    c.probe_ready = c.adopted_ready
                c.log_stamp = self.k.stamp_log(self.dir, c.name)
                self.changed.set()
            try:
                async with trio.open_nursery() as probes:
                    for probe in c.probes.values():
                        probes.start_soon(self._probe, c, probe)
                    if c.stdin_keeper is not None:
                        probes.start_soon(self._release_stdin, c)
                    code = await c.handle.wait()
                    probes.cancel_scope.cancel()
            finally:
                self.k.unstamp_log(c.log_stamp)
                c.log_stamp = None
            finished = registry.now()
            if code is None:
                terminated = {"exitCode": 255, "reason": "Unknown", "startedAt": c.started_at,
                              "finishedAt": finished,
                              "message": "the container exited while no kubelet was its parent: "
                                         "its exit code is unknown"}
            else:
                terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                              "startedAt": c.started_at, "finishedAt": finished}
            terminated["containerID"] = f"pid://{c.handle.pid}"
            c.state = {"terminated": terminated}
            c.handle = None
            c.probe_ready = None if c.probe_ready is None else False
            failed = code != 0
            restart = self.policy == "Always" or (self.policy == "OnFailure" and failed)
            if not restart:
                c.done = True
                self._save_records()
                self.changed.set()
                return
            c.restarts += 1
            delay = backoff * self.k.settings.time_scale
            backoff = min(backoff * 2, BACKOFF_MAX)
            c.last_state = c.state
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off {delay:g}s restarting failed container={c.name}"}}
            self._save_records()
            self._event("BackOff", f"Back-off restarting failed container {c.name}", "Warning")
            self.changed.set()
            await trio.sleep(delay)

    async def _probe(self, c: ContainerState, probe: probing.Probe) -> None:
        """Run one probe of C for as long as this run of C lasts."""
        counter = probing.Counter(probe)
        if probe.kind == "readinessProbe" and c.probe_ready:
            counter.result = True          # adopted ready: keep it until it fails
        await trio.sleep(probe.initial_delay)
        failures = 0
        while True:
            if probe.kind != "startupProbe":
                while not c.started:
                    await trio.sleep(0.1)
            failure = await self._probe_once(c, probe)
            outcome = counter.add(failure is None)
            if failure is None:
                failures = 0
            else:
                failures += 1
                if failures % EVENT_EVERY == 1:
                    self._event("Unhealthy", f"{probe.word} probe failed: {failure}", "Warning")
            if probe.kind == "readinessProbe":
                if counter.result != c.probe_ready:
                    c.probe_ready = counter.result
                    self.changed.set()
            elif outcome == "up" and probe.kind == "startupProbe":
                c.started = True
                self.changed.set()
                return
            elif outcome == "down":
                self._event("Killing", f"Container {c.name} failed {probe.word.lower()} probe, "
                                       f"will be restarted")
                handle = c.handle
                if handle is not None:
                    with trio.CancelScope(shield=True):
                        await handle.stop(self._grace())
                return
            await trio.sleep(probe.period)

    async def _probe_once(self, c: ContainerState, probe: probing.Probe) -> str | None:
        sb = self.sandbox
        try:
            if probe.action == "tcpSocket":
                return await trio.to_thread.run_sync(probing.tcp_check, self.k.node_ns, probe.host or sb.ip,
                                                     probe.port, probe.timeout)
            if probe.action == "httpGet":
                return await trio.to_thread.run_sync(probing.http_check, self.k.node_ns, probe, sb.ip,
                                                     probe.timeout)
            env = self._env(c)
            runtime.check_exec(list(probe.command), env)
            return await probing.exec_check(netns.exec_argv(sb.namespace, list(probe.command),
                                                            uts_pid=sb.pause_pid), env, probe.timeout)
        except Exception as e:        # a probe that cannot run has failed, and says why
            return str(e)

    async def _kill_containers(self) -> None:
        """Stop every container (their sandbox is gone) and say so in their status."""
        async def kill(c: ContainerState) -> None:
            if c.handle is None:
                return
            await c.handle.stop(self._grace())
            code = c.handle.returncode if c.handle.returncode not in (None, -1) else 137
            terminated = {"exitCode": code, "reason": "Error", "startedAt": c.started_at,
                          "finishedAt": registry.now(), "containerID": f"pid://{c.handle.pid}"}
            c.handle = None
            if self.policy == "Never":
                c.state, c.done = {"terminated": terminated}, True
            else:
                c.last_state = {"terminated": terminated}
                c.restarts += 1
                c.state = {"waiting": {"reason": "ContainerCreating"}}

        async with trio.open_nursery() as nursery:
            for c in self.containers:
                nursery.start_soon(kill, c)
        self._save_records()

    # -- status ---------------------------------------------------------------

    def status(self) -> dict:
        statuses = []
        for c in self.containers:
            # imageID: a real kubelet reports the image's digest; netemu runs no
            # images. The API always carries the field (not omitempty), and
            # typed clients (the Python kubernetes client) refuse a status without it.
            st = {"name": c.name, "image": c.spec.get("image", ""), "imageID": "", "ready": c.ready,
                  "restartCount": c.restarts, "state": c.state, "started": c.running and c.started}
            if c.handle is not None:
                st["containerID"] = f"pid://{c.handle.pid}"
            if c.last_state:
                st["lastState"] = c.last_state
            statuses.append(st)
        phase = self._phase()
        sandbox_ready = self.pause is not None and self.pause.running
        all_ready = (bool(self.containers) and all(c.ready for c in self.containers)
                     and phase == "Running" and sandbox_ready)
        status = {"phase": phase, "hostIP": self.k.node_address(), "startTime": self.start_time,
                  "conditions": [{"type": "PodReadyToStartContainers", "status": str(sandbox_ready)},
                                 {"type": "PodScheduled", "status": "True"},
                                 {"type": "Initialized", "status": "True"},
                                 {"type": "ContainersReady", "status": str(all_ready)},
                                 {"type": "Ready", "status": str(all_ready)}],
                  "containerStatuses": statuses}
        if self.sandbox is not None and self.sandbox.pause_pid:
            status["podIP"] = self.sandbox.ip
            status["podIPs"] = [{"ip": self.sandbox.ip}]
        return status

    def _phase(self) -> str:
        if self.containers and all(c.done for c in self.containers):
            codes = [c.state.get("terminated", {}).get("exitCode", 1) for c in self.containers]
            return "Succeeded" if all(code == 0 for code in codes) else "Failed"
        if self.sandbox is None or not self.sandbox.pause_pid:
            return "Pending"
        if any(c.running for c in self.containers):
            return "Running"
        if any(c.restarts or c.done for c in self.containers):
            return "Running"
        return "Pending"

    async def _publish_loop(self) -> None:
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            published = (self.status(), self.sandbox_annotation())
            if published != self.last_status:
                self.last_status = published
                self._write_status(*published)
            await trio.sleep(0.02)

    def sandbox_annotation(self) -> str | None:
        """The running sandbox as the Pod shows it to readers off the node
        (sandboxes.ANNOTATION); None while there is none (as status.podIP)."""
        if self.sandbox is not None and self.sandbox.pause_pid:
            return sandboxes.annotation(self.sandbox)
        return None

    def _write_status(self, status: dict, sandbox: str | None) -> None:
        def change(pod):
            if pod["metadata"]["uid"] == self.uid:
                pod["status"] = status
                annotations = pod["metadata"].setdefault("annotations", {})
                if sandbox is None:
                    annotations.pop(sandboxes.ANNOTATION, None)
                    if not annotations:
                        del pod["metadata"]["annotations"]
                else:
                    annotations[sandboxes.ANNOTATION] = sandbox
        try:
            registry.mutate(self.k.store, "Pod", self.ns, self.name, change)
        except Exception:
            log.exception("pod %s: status update failed", self.key)

    def _event(self, reason: str, message: str, type_: str = "Normal") -> None:
        with contextlib.suppress(Exception):
            registry.record_event(self.k.store, self.pod, reason, message, type_=type_,
                                  source=f"kubelet, {self.k.node}")

    # -- teardown -------------------------------------------------------------

    async def _teardown(self) -> None:
        """Stop everything of the pod, free its address and folder, and delete
        its object last, so that whoever waits for the object to vanish knows
        the pod is gone. Each step is tried whatever the previous one did."""
        k = self.k
        with contextlib.suppress(Exception):
            await trio.to_thread.run_sync(self._adopt)
        grace = self._grace()
        async with trio.open_nursery() as nursery:
            for c in self.containers:
                if c.handle is not None:
                    nursery.start_soon(c.handle.stop, grace)
        try:
            await self._remove_sandbox()
        except Exception:
            log.exception("pod %s: sandbox removal failed", self.key)
        with contextlib.suppress(Exception):
            k.ipam.release(self.uid)
        await trio.to_thread.run_sync(shutil.rmtree, self.dir, True)
        try:
            current = registry.get(k.store, "Pod", self.ns, self.name)
            if current is not None and current["metadata"]["uid"] == self.uid \
                    and current["metadata"].get("deletionTimestamp"):
                registry.delete(k.store, "Pod", self.ns, self.name)
        except Exception:
            log.exception("pod %s: delete failed", self.key)

    async def _remove_sandbox(self) -> None:
        k = self.k
        if self.pause is not None:
            await self.pause.stop(MIN_GRACE)
        self.pause = None
        with contextlib.suppress(Exception):
            await trio.to_thread.run_sync(hostport.remove, k.node_ns, self.key)
        if self.sandbox is not None:
            with contextlib.suppress(Exception):
                await trio.to_thread.run_sync(sandboxes.destroy_network, k.cluster, k.node, self.sandbox)
        self.sandbox = None


def node_address_of(node: dict) -> str:
    for a in node.get("status", {}).get("addresses", []):
        if a.get("type") == "InternalIP":
            return a["address"]
    return ""
