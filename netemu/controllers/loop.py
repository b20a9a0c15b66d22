"""The informer loop every controller runs: wake on a change, reconcile, repeat.

Controllers here are level-triggered, as Kubernetes' are: a pass reads the current
objects and converges them; it does not depend on which event woke it. Watch
events make a pass start at once (the endpoints controller must follow a pod
within a fraction of a second); a periodic resync catches anything a watch could
miss and drives timers (a Job's backoff delay), which a pass reports by returning
the number of seconds until it wants to run again.

A pass runs in a worker thread: store calls are blocking SQLite reads and writes,
and the controllers of one control-plane process must not stall each other.

A controller whose passes depend on nothing but the objects it watches (no
clock) may say so with IDLE_RESYNC: after a pass that wanted no timer and had
no failure, it sleeps until a change or IDLE_RESYNC, not RESYNC_SECONDS. Every
such pass lists every pod: at 1,000 pods, four of them resyncing every 2 s
were most of an idle control plane's CPU.

Every pod change wakes every controller that watches pods, and each decodes
every pod (at 1,000 pods, listing and decoding was 43% of the controllers
process's CPU while Services and pods changed, py-spy): a controller of owners
(Jobs, DaemonSets, ReplicaSets, Deployments, ReplicationControllers) first
asks whether there is any owner at all (registry.names_, keys only), so that
a cluster without any costs nothing but the endpoints controllers and the
scheduler, which the pod change is for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import trio

from netemu.store.base import Compacted, Store

log = logging.getLogger(__name__)

RESYNC_SECONDS = 2.0
IDLE_RESYNC = 60.0          # for controllers that ask for it (see the module's text)
MIN_DELAY = 0.01

_pass = threading.local()   # .failed: a guarded step of the pass in this thread raised


async def run_reconciler(store: Store, name: str, prefixes: list[str],
                         sync: Callable[[], float | None], *,
                         resync: float = RESYNC_SECONDS, idle_resync: float | None = None) -> None:
    """Run SYNC now, again after every change under PREFIXES, and at least every
    RESYNC seconds (sooner when a pass returns a smaller delay; IDLE_RESYNC
    instead after a pass that wanted no timer and had no failure). Never
    returns."""
    def run_pass() -> tuple[float | None, bool]:
        _pass.failed = False
        try:
            return sync(), _pass.failed
        finally:
            _pass.failed = False

    state = {"wake": trio.Event()}

    async def watch(prefix: str, since: int) -> None:
        while True:
            try:
                async for _ in store.watch(prefix, since):
                    state["wake"].set()
            except Compacted:
                # We fell far behind; the next full pass re-reads everything anyway.
                since = store.revision()
                state["wake"].set()

    async with trio.open_nursery() as nursery:
        since = store.revision()
        for prefix in prefixes:
            nursery.start_soon(watch, prefix, since)
        while True:
            # A fresh Event before the pass: a change made during the pass wakes
            # the next one instead of being lost.
            state["wake"] = trio.Event()
            delay, failed = await trio.to_thread.run_sync(run_pass)
            if delay is not None:
                timeout = max(MIN_DELAY, min(resync, delay))
            else:
                timeout = resync if failed or idle_resync is None else idle_resync
            with trio.move_on_after(timeout):
                await state["wake"].wait()
            log.debug("%s: pass", name)


def guarded(name: str, step: Callable[[], float | None]) -> Callable[[], float | None]:
    """STEP, but an exception about one object is logged instead of ending the
    controller (the per-object loops call this around each object)."""
    def run() -> float | None:
        try:
            return step()
        except Exception:   # noqa: BLE001 - one bad object must not stop the others
            log.exception("%s failed", name)
            _pass.failed = True         # retried at the next resync, not the idle one
            return None
    return run


def min_delay(*delays: float | None) -> float | None:
    real = [d for d in delays if d is not None]
    return min(real) if real else None
