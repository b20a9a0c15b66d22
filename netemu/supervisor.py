"""Running daemons the way a node's init system would: start, log, restart.

Every process gets its own process group (so it can be stopped with whatever it
started), and its output appended to a log file under the cluster's state folder.
It also carries the cluster's name in its environment (names.CLUSTER_ENV), for
the commands it runs; that is not how `down` finds it (a user's shell may carry
the same variable): the cluster's journal is (see cluster.cluster_processes).
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
PARENT_CHECK = 0.5


async def watch_parent(scope: trio.CancelScope) -> None:
    """Cancel SCOPE when this process's parent is gone (we were re-parented).

    A node daemon's parent is the control plane's nodes part; if that is killed
    (kill -9), its successor starts new daemons, and the old ones must make way
    rather than hold the node's ports and devices. Not PR_SET_PDEATHSIG: it
    would fire when the thread that forked us ends, and trio forks from worker
    threads that come and go. A pidfd of the parent, which becomes readable
    when it exits (no wake-ups meanwhile: an idle agent was woken twice a
    second by the poll this replaced); polled every PARENT_CHECK where the
    kernel has no pidfd_open."""
    parent = os.getppid()
    try:
        pidfd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        pidfd = None
    try:
        # Opened after a re-parenting: then it is the new parent's (init's).
        if pidfd is not None and os.getppid() == parent:
            await trio.lowlevel.wait_readable(pidfd)
        while os.getppid() == parent:
            await trio.sleep(PARENT_CHECK)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    log.warning("parent %d is gone; stopping", parent)
    scope.cancel()


async def stop_on_signal(scope: trio.CancelScope) -> None:
    """Cancel SCOPE at the first SIGTERM or SIGINT: a daemon's way to stop
    cleanly (its finally-blocks release what it holds)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping")
            scope.cancel()
            return


def daemon_env(cluster: str) -> dict:
    env = dict(os.environ)
    env[names.CLUSTER_ENV] = cluster
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


async def stop(proc: trio.Process, grace: float = 3.0) -> None:
    # A child in a session of its own (a node daemon) is stopped with what it
    # started: its process group. One in ours (the API server) leads no group:
    # killpg of its pid fails (ESRCH), so it is signalled alone; otherwise it
    # got no signal at all and its parent waited out both timeouts (8 s of
    # every `netemu down`) before leaving it for teardown's SIGKILL.
    try:
        send = os.killpg if os.getpgid(proc.pid) == proc.pid else os.kill
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            send(proc.pid, sig)
        with trio.move_on_after(wait):
            await proc.wait()
            return


async def supervise(cluster: str, name: str, argv: list[str], log_path: str,
                    restarts_path: str | None = None, new_session: bool = True) -> None:
    """Keep ARGV running until cancelled; count restarts in RESTARTS_PATH.
    NEW_SESSION: a session of its own (node daemons: teardown finds them in
    their node's namespace), else ours (a process in the machine's namespace)."""
    restarts = 0
    while True:
        with open(log_path, "ab") as out:
            proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=out, env=daemon_env(cluster),
                                                    start_new_session=new_session)
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


def run_node_daemon(role: str, factory, argv: list[str] | None = None) -> int:
    """The common main() of the per-node daemons (overlay, proxy):

        python -m netemu.<part>.daemon CLUSTER NODE

    Enters the node's namespace before any thread exists (so every socket,
    device and nft context the daemon makes is the node's), opens the store, and
    runs FACTORY(cluster, node, store).run() under trio until SIGTERM or SIGINT,
    which cancel it cleanly so its finally-blocks release what it holds.
    """
    import argparse

    from netemu import netns
    from netemu.store import open_store

    parser = argparse.ArgumentParser(prog=f"netemu-{role}")
    parser.add_argument("cluster")
    parser.add_argument("node")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {role}[{args.node}] %(levelname)s %(message)s")
    netns.enter(names.node_ns(args.cluster, args.node))
    store = open_store(args.cluster)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            nursery.start_soon(watch_parent, nursery.cancel_scope)
            await factory(args.cluster, args.node, store).run()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return 0
