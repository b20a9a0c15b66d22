"""What a controller decided to do, and the one place that does it to the store.

Each controller's reconcile function is pure: it reads objects and returns a list of
these actions. `apply` carries them out against the state store, records the
Events Kubernetes' controllers record (`Created pod: web-x7k2p`), and isolates
failures: an action that loses a race (the object changed or vanished meanwhile)
is skipped, because the next reconcile pass sees the new state and decides again.

Pod creation is bounded as in kube-controller-manager: a controller asks for at
most BURST_REPLICAS pods per pass (its reconcile function never builds more, so a
Job or RC asking for 2^31 pods costs 500 pod objects of memory, not 2^31), and
`apply` creates them in slow-start batches of 1, 2, 4, ... pods
(controller.slowStartBatch): once a batch had a failure the rest are skipped and
a FailedCreate event says why, so a request that fails for every pod (a full
store, a refused object) is tried a handful of times per pass, not 500.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from netemu.store import registry
from netemu.store.base import Conflict, Store

log = logging.getLogger(__name__)

# kube-controller-manager's burstReplicas (replication, replicaset) and the Job
# controller's MaxPodCreateDeletePerSync: pods one pass creates or deletes.
BURST_REPLICAS = 500
SLOW_START_INITIAL_BATCH = 1


@dataclasses.dataclass
class CreatePod:
    """Create POD (it carries generateName); record SuccessfulCreate on OWNER."""
    pod: dict
    owner: dict


@dataclasses.dataclass
class DeletePod:
    """Delete POD as the API server would (see api.delete_pod); record
    SuccessfulDelete on OWNER when there is one."""
    pod: dict
    owner: dict | None = None


@dataclasses.dataclass
class CreateObject:
    """Create any object (a Deployment's ReplicaSet, a Service's Endpoints)."""
    obj: dict
    owner: dict | None = None
    reason: str = ""
    message: str = ""


@dataclasses.dataclass
class DeleteObject:
    kind: str
    namespace: str | None
    name: str


@dataclasses.dataclass
class Mutate:
    """Read-modify-write of one object, applied only while its uid is still UID
    (so a change meant for a deleted object never lands on a new one of the same
    name). CHANGE edits the object in place."""
    kind: str
    namespace: str | None
    name: str
    uid: str | None
    change: Callable[[dict], None]
    why: str = ""
    event: "RecordEvent | None" = None      # recorded only if the change landed


@dataclasses.dataclass
class SetStatus:
    """Replace OBJ's status with STATUS (only written when it differs)."""
    obj: dict
    status: dict


@dataclasses.dataclass
class RecordEvent:
    obj: dict
    reason: str
    message: str
    type_: str = "Normal"


def set_status(obj: dict, status: dict) -> list:
    """A SetStatus action when STATUS differs from OBJ's, else nothing."""
    return [] if (obj.get("status") or {}) == status else [SetStatus(obj, status)]


def apply(store: Store, actions: list, source: str) -> None:
    """Carry out ACTIONS in order; SOURCE names the controller in Events.
    Consecutive CreatePod actions for one owner go in slow-start batches."""
    from netemu import api

    i = 0
    while i < len(actions):
        action = actions[i]
        if isinstance(action, CreatePod):
            run = i + 1
            while run < len(actions) and isinstance(actions[run], CreatePod) \
                    and actions[run].owner is action.owner:
                run += 1
            _create_slow_start(store, actions[i:run], source)
            i = run
            continue
        try:
            _apply_one(store, action, source, api)
        except Conflict as err:
            log.debug("%s: %s lost a race: %s", source, type(action).__name__, err)
        i += 1


def _create_slow_start(store: Store, creates: list, source: str) -> int:
    """Create the pods of CREATES (one owner) in batches of 1, 2, 4, ...; stop
    after the first batch with a failure. Returns how many were created.

    Kubernetes runs a batch's requests in parallel; netemu's store takes one
    write at a time, so a batch runs in order, but which pods are tried is the
    same: every pod of a batch, and no further batch once one failed.
    """
    created, batch, done = 0, SLOW_START_INITIAL_BATCH, 0
    while done < len(creates):
        failed = False
        for action in creates[done:done + batch]:
            try:
                pod = registry.create(store, action.pod)
            except Exception as err:    # any refusal: the next pass tries again
                failed = True
                log.warning("%s: creating a pod for %s failed: %s", source,
                            action.owner["metadata"].get("name"), err)
                try:
                    registry.record_event(store, action.owner, "FailedCreate", f"Error creating: {err}",
                                          type_="Warning", source=source)
                except Exception:       # the store itself is failing: the log has it
                    pass
                continue
            created += 1
            registry.record_event(store, action.owner, "SuccessfulCreate",
                                  f"Created pod: {pod['metadata']['name']}", source=source)
        done += batch
        if failed:
            skipped = len(creates) - done
            if skipped > 0:
                log.warning("%s: skipped creating %d pod(s) for %s after a failure", source, skipped,
                            creates[0].owner["metadata"].get("name"))
            break
        batch *= 2
    return created


def _apply_one(store: Store, action, source: str, api) -> None:
    if isinstance(action, CreatePod):
        pod = registry.create(store, action.pod)
        registry.record_event(store, action.owner, "SuccessfulCreate",
                              f"Created pod: {pod['metadata']['name']}", source=source)
    elif isinstance(action, DeletePod):
        meta = action.pod["metadata"]
        if api.delete_pod(store, meta.get("namespace", "default"), meta["name"],
                          uid=meta.get("uid")) and action.owner is not None:
            registry.record_event(store, action.owner, "SuccessfulDelete",
                                  f"Deleted pod: {meta['name']}", source=source)
    elif isinstance(action, CreateObject):
        registry.create(store, action.obj)
        if action.owner is not None and action.reason:
            registry.record_event(store, action.owner, action.reason, action.message, source=source)
    elif isinstance(action, DeleteObject):
        registry.delete(store, action.kind, action.namespace, action.name)
    elif isinstance(action, Mutate):
        def change(obj: dict) -> None:
            if action.uid is not None and obj["metadata"].get("uid") != action.uid:
                raise Gone()
            action.change(obj)
        try:
            done = registry.mutate(store, action.kind, action.namespace, action.name, change)
        except Gone:
            return
        if done is not None and action.event is not None:
            _apply_one(store, action.event, source, api)
    elif isinstance(action, SetStatus):
        meta = action.obj["metadata"]

        def replace(obj: dict) -> None:
            if obj["metadata"].get("uid") != meta.get("uid"):
                raise Gone()
            obj["status"] = action.status
        try:
            registry.mutate(store, action.obj["kind"], meta.get("namespace"), meta["name"], replace)
        except Gone:
            pass
    elif isinstance(action, RecordEvent):
        registry.record_event(store, action.obj, action.reason, action.message,
                              type_=action.type_, source=source)
    else:
        raise TypeError(f"unknown action {action!r}")


class Gone(Exception):
    """The object was replaced by another of the same name."""
