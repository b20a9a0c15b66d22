"""Running daemons the way a node's init system would: start, log, restart.

Every process gets the cluster's tag in its environment (names.CLUSTER_ENV), its
own process group (so it can be stopped with whatever it started), and its output
appended to a log file under the cluster's state folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

import trio

from netemu import names

log = logging.getLogger("netemu.supervisor")

RESTART_DELAY = 0.5


def daemon_env(cluster: str) -> dict:
    env = dict(os.environ)
    env[names.CLUSTER_ENV] = cluster
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


async def stop(proc: trio.Process, grace: float = 3.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with trio.move_on_after(wait):
            await proc.wait()
            return


async def supervise(cluster: str, name: str, argv: list[str], log_path: str,
                    restarts_path: str | None = None) -> None:
    """Keep ARGV running until cancelled; count restarts in RESTARTS_PATH."""
    restarts = 0
    while True:
        with open(log_path, "ab") as out:
            proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=out, env=daemon_env(cluster),
                                                    start_new_session=True)
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    await stop(proc)
        restarts += 1
        log.warning("%s exited with %s; restarting (restart %d)", name, code, restarts)
        if restarts_path:
            with open(restarts_path, "w") as f:
                f.write(str(restarts))
        await trio.sleep(RESTART_DELAY)
