"""The Job controller: run pods until `completions` of them succeed.

Kubernetes' semantics (pkg/controller/job), as netemu emulates them:
  - at most `parallelism` pods are active at once, and never more than the
    completions still missing; surplus active pods are deleted;
  - the Job is Complete when `succeeded == completions` (with completions unset,
    the work-queue pattern: when one pod succeeded and none is active);
  - failures are pods in phase Failed (restartPolicy Never: each is replaced by a
    new pod) plus, with restartPolicy OnFailure, the container restarts the kubelet
    did in place (the sum of restartCount); when failures exceed `backoffLimit`
    (default 6) the Job fails with reason BackoffLimitExceeded and its active pods
    are deleted;
  - after a failure the next pod waits 10 s, 20 s, 40 s … (doubling per failure,
    capped at 6 min), counted from the last failure and multiplied by the
    cluster's time_scale (a test can shrink it);
  - `activeDeadlineSeconds` after startTime the Job fails with reason
    DeadlineExceeded (this user-given deadline is not scaled);
  - pods are named `<job>-<5 chars>` and labelled controller-uid and job-name
    (and their batch.kubernetes.io/ forms) on top of the template's labels.
The Job's status keeps its counts (active, succeeded, failed, ready), startTime,
completionTime and the Complete / Failed conditions `kubectl describe job` shows.
Finished pods are left in place, as in Kubernetes (`kubectl logs` reads them).
"""

from __future__ import annotations

import time

from netemu.controllers import actions as act
from netemu.controllers import podutil
from netemu.controllers.loop import IDLE_RESYNC, guarded, min_delay, run_reconciler
from netemu.k8s import ownership
from netemu.store import registry
from netemu.store.base import Store

SOURCE = "job-controller"
BACKOFF_BASE = 10.0
BACKOFF_MAX = 360.0


def backoff_delay(failures: int, time_scale: float = 1.0) -> float:
    """Seconds to wait before the next pod after FAILURES failures."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX) * time_scale


def _finished_at(pod: dict) -> float | None:
    latest = None
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        term = ((c.get("state") or {}).get("terminated") or (c.get("lastState") or {}).get("terminated") or {})
        stamp = registry.parse_time(term.get("finishedAt"))
        if stamp and (latest is None or stamp.timestamp() > latest):
            latest = stamp.timestamp()
    return latest


def _failed_at(pod: dict) -> float:
    """When POD failed: its containers' finishedAt, else (a kubelet that did not
    say) its start or creation time, so the backoff still ends."""
    stamp = _finished_at(pod)
    if stamp is not None:
        return stamp
    for field in ((pod.get("status") or {}).get("startTime"), pod["metadata"].get("creationTimestamp")):
        parsed = registry.parse_time(field)
        if parsed:
            return parsed.timestamp()
    return 0.0


def _condition(type_: str, reason: str, message: str, stamp: str) -> dict:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": stamp, "lastTransitionTime": stamp}


def _finished_condition(job: dict) -> str | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"]
    return None


def reconcile_job(job: dict, pods: list[dict], now: float, time_scale: float = 1.0) -> tuple[list, float | None]:
    """(actions, seconds until the Job wants another look or None). PODS: the
    pods of its namespace. NOW: wall-clock seconds."""
    spec = job.get("spec") or {}
    meta = job["metadata"]
    if meta.get("deletionTimestamp"):
        return [], None         # being deleted (its pods orphaned first): nothing new starts
    old_status = job.get("status") or {}
    status = dict(old_status)
    mine = [p for p in pods if ownership.owned_by(p, job)]
    active = [p for p in mine if podutil.active(p)]
    succeeded = sum(1 for p in mine if podutil.phase(p) == "Succeeded")
    failed_pods = [p for p in mine if podutil.phase(p) == "Failed"]
    restarts = sum(podutil.restart_count(p) for p in mine) \
        if (spec.get("template") or {}).get("spec", {}).get("restartPolicy") == "OnFailure" else 0
    # Counts never go down: a finished pod someone deleted still counted.
    succeeded = max(succeeded, int(old_status.get("succeeded") or 0))
    failed = max(len(failed_pods) + restarts, int(old_status.get("failed") or 0))
    stamp = registry.now()
    actions: list = []
    wake: float | None = None

    if _finished_condition(job):
        # A finished Job only keeps its counts current; it starts nothing.
        for pod in active:
            actions.append(act.DeletePod(pod, job))
        status.update(active=0, succeeded=succeeded, failed=failed, ready=0)
        return actions + act.set_status(job, _clean(status)), None

    start = registry.parse_time(old_status.get("startTime"))
    start_ts = start.timestamp() if start else now
    status.setdefault("startTime", stamp)
    completions = spec.get("completions")
    parallelism = int(spec.get("parallelism", 1) if spec.get("parallelism") is not None else 1)
    backoff_limit = int(spec.get("backoffLimit", 6) if spec.get("backoffLimit") is not None else 6)
    deadline = spec.get("activeDeadlineSeconds")

    failure = None
    if failed > backoff_limit:
        failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
    elif deadline is not None and now - start_ts >= float(deadline):
        failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
    complete = (succeeded >= int(completions)) if completions is not None else (succeeded > 0 and not active)

    if failure:
        reason, message = failure
        for pod in active:
            actions.append(act.DeletePod(pod, job))
        status["conditions"] = (old_status.get("conditions") or []) + [_condition("Failed", reason, message, stamp)]
        actions.append(act.RecordEvent(job, reason, message, type_="Warning"))
        active = []
    elif complete:
        for pod in active:
            actions.append(act.DeletePod(pod, job))
        active = []
        status["conditions"] = (old_status.get("conditions") or []) + [
            _condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods", stamp)]
        status["completionTime"] = stamp
        actions.append(act.RecordEvent(job, "Completed", "Job completed"))
    elif not spec.get("suspend"):
        if completions is not None:
            wanted = min(parallelism, int(completions) - succeeded)
        else:
            wanted = parallelism if succeeded == 0 else 0
        wanted = max(0, wanted)
        if len(active) > wanted:
            for pod in sorted(active, key=lambda p: (podutil.phase(p) == "Running", p["metadata"]["name"]))[
                    :len(active) - wanted]:
                actions.append(act.DeletePod(pod, job))
        elif len(active) < wanted:
            # Back off after failures, counted from the most recent one.
            ready_at = 0.0
            if failed:
                last = max((_failed_at(p) for p in failed_pods), default=None)
                if last is not None:
                    ready_at = last + backoff_delay(failed, time_scale)
            if now >= ready_at:
                labels = {"controller-uid": meta["uid"], "job-name": meta["name"],
                          "batch.kubernetes.io/controller-uid": meta["uid"],
                          "batch.kubernetes.io/job-name": meta["name"]}
                template = spec.get("template") or {}
                # At most BURST_REPLICAS per pass (MaxPodCreateDeletePerSync).
                for _ in range(min(wanted - len(active), act.BURST_REPLICAS)):
                    actions.append(act.CreatePod(podutil.pod_from_template(job, template, extra_labels=labels), job))
            else:
                wake = ready_at - now
        if deadline is not None:
            wake = min_delay(wake, start_ts + float(deadline) - now)

    status.update(active=len(active), succeeded=succeeded, failed=failed,
                  ready=sum(1 for p in active if podutil.ready(p)))
    return actions + act.set_status(job, _clean(status)), wake


def _clean(status: dict) -> dict:
    """Kubernetes omits zero counts from a Job's status."""
    return {k: v for k, v in status.items() if v not in (0, None) or k == "ready"}


def sync_once(store: Store, time_scale: float = 1.0) -> float | None:
    if not registry.names_(store, "Job"):
        return None                     # nothing to control: no pod decoded (see loop.py)
    pods = registry.list_(store, "Pod")
    by_ns: dict[str, list[dict]] = {}
    for pod in pods:
        by_ns.setdefault(pod["metadata"].get("namespace", "default"), []).append(pod)
    wake = None
    now = time.time()
    for job in registry.list_(store, "Job"):
        def step(job=job) -> float | None:
            actions, delay = reconcile_job(job, by_ns.get(job["metadata"].get("namespace", "default"), []),
                                           now, time_scale)
            act.apply(store, actions, SOURCE)
            return delay
        wake = min_delay(wake, guarded("job " + job["metadata"]["name"], step)())
    return wake


async def run(store: Store, settings=None) -> None:
    scale = float(getattr(settings, "time_scale", 1.0) or 1.0)
    # A pass reports its timers (backoff, activeDeadlineSeconds): otherwise
    # nothing changes without a write, so an idle pass need not come back.
    await run_reconciler(store, "job", [registry.prefix("Pod"), registry.prefix("Job")],
                         lambda: sync_once(store, scale), idle_resync=IDLE_RESYNC)
