"""The controller manager: every controller of the control plane in one trio nursery.

The counterpart of kube-controller-manager plus kube-scheduler. The cluster's
control-plane process runs `run_all`; each controller is supervised on its own, so
a crash in one is logged and that controller alone restarts after a short delay,
while the others keep running.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from netemu.controllers import (daemonset, endpoints, garbagecollector, job, namespace, nodelifecycle,
                                replication, scheduler)
from netemu.store.base import Store

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0

CONTROLLERS: dict[str, Callable[..., Awaitable[None]]] = {
    "scheduler": scheduler.run,
    "endpoints": endpoints.run,         # and the EndpointSlice controller, in the same pass
    "namespace": namespace.run,
    "replication": replication.run,
    "job": job.run,
    "daemonset": daemonset.run,
    "garbage-collector": garbagecollector.run,
    "node-lifecycle": nodelifecycle.run,
}


async def supervise(name: str, run: Callable[..., Awaitable[None]], store: Store, settings,
                    restart_delay: float = RESTART_DELAY) -> None:
    """Run one controller forever, restarting it after RESTART_DELAY when it fails."""
    while True:
        try:
            await run(store, settings)
            log.warning("controller %s returned; restarting", name)
        except Exception:       # noqa: BLE001 - one controller's bug must not stop the rest
            log.exception("controller %s crashed; restarting in %.1f s", name, restart_delay)
        await trio.sleep(restart_delay)


async def run_all(store: Store, settings=None, *, only: list[str] | None = None) -> None:
    """Run every controller (or those named in ONLY) until cancelled."""
    async with trio.open_nursery() as nursery:
        for name, run in CONTROLLERS.items():
            if only is None or name in only:
                nursery.start_soon(supervise, name, run, store, settings)
