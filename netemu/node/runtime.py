"""The container runtime's part of the node agent: processes, and what it knows of them.

A container or a pause is a process started through nsenter. The kubelet's own
memory of them does not survive a restart of the control plane (the kubelets
run inside it), but the processes do, exactly as containers outlive a restarted
kubelet on a real node. So what a restarted kubelet needs to find them again is
written to the pod's folder, as containerd keeps its own records: each process
by pid AND its start time in clock ticks (/proc/PID/stat field 22), so that a
recycled pid is never taken for the container.

Also here, because both are decided before anything is started: whether a
container's argv and environment can be given to execve at all (a NUL or an `=`
in a name cannot: CreateContainerError), and whether its program exists
(RunContainerError, with runc's wording).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal

import trio

from netemu import journal


@dataclasses.dataclass(frozen=True)
class ProcessRef:
    pid: int
    start: int          # start time in clock ticks since boot: tells a recycled pid apart


def start_ticks(pid: int) -> int | None:
    """PID's start time, or None when it is gone or a zombie (it has exited)."""
    st = journal.process_stat(pid)
    return st[2] if st is not None and st[0] not in ("Z", "X") else None


def ref_of(pid: int) -> ProcessRef | None:
    start = start_ticks(pid)
    return ProcessRef(pid, start) if start is not None else None


def alive(ref: ProcessRef | None) -> bool:
    return ref is not None and ref.pid > 0 and start_ticks(ref.pid) == ref.start


def exit_code(returncode: int) -> int:
    """Kubernetes' exit code: a process killed by signal N reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class Handle:
    """A running container or pause: started by this kubelet (PROC, a trio
    Process: its exit code is known) or adopted from an earlier kubelet (only its
    pid: waited for through a pidfd; the exit code is known only if the process
    is still this process's child, which it is after an in-process restart)."""

    def __init__(self, ref: ProcessRef, proc: trio.Process | None = None):
        self.ref = ref
        self.proc = proc
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.ref.pid

    @property
    def running(self) -> bool:
        return self.returncode is None and alive(self.ref)

    async def wait(self) -> int | None:
        """Wait for the exit; the Kubernetes exit code, or None if unknowable."""
        if self.proc is not None:
            self.returncode = exit_code(await self.proc.wait())
            return self.returncode
        try:
            fd = os.pidfd_open(self.ref.pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            try:
                if alive(self.ref):
                    await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        code = None
        with contextlib.suppress(ChildProcessError, OSError):
            pid, status = os.waitpid(self.ref.pid, os.WNOHANG)
            if pid == self.ref.pid:
                code = exit_code(os.waitstatus_to_exitcode(status))
        self.returncode = code if code is not None else -1
        return code

    async def stop(self, grace: float) -> None:
        """SIGTERM the process group, SIGKILL after GRACE seconds (as the kubelet
        does with terminationGracePeriodSeconds)."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not alive(self.ref):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.ref.pid, sig)
            with trio.move_on_after(wait):
                while alive(self.ref):
                    await trio.sleep(0.02)
        if self.proc is not None and self.proc.returncode is None:
            with trio.move_on_after(1):
                await self.proc.wait()
        elif self.proc is None:
            # Adopted after an in-process restart, it may be this process's
            # child: reap it, or it stays a zombie.
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.ref.pid, os.WNOHANG)


def kill_now(ref: ProcessRef | None) -> None:
    """SIGKILL REF's process group if REF still names that process (orphan clean-up)."""
    if alive(ref):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ref.pid, signal.SIGKILL)


# -- the pod folder's record of its containers ------------------------------------

RECORDS = "containers.json"


def save_records(pod_dir: str, records: dict) -> None:
    tmp = os.path.join(pod_dir, RECORDS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(records, f)
    os.replace(tmp, os.path.join(pod_dir, RECORDS))


def load_records(pod_dir: str) -> dict:
    try:
        with open(os.path.join(pod_dir, RECORDS)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


# -- what can be started ------------------------------------------------------------

class CreateError(Exception):
    """The container cannot be created as specified (waiting reason CreateContainerError)."""


class StartError(Exception):
    """The container's process cannot be started (waiting reason RunContainerError)."""


def check_exec(argv: list[str], env: dict[str, str]) -> None:
    """Raise CreateError if execve could not take ARGV and ENV at all.

    Admission refuses such pods, but a pod written to the store some other way
    (an older netemu, by hand) must fail alone and say why, not raise inside the
    kubelet."""
    if not argv:
        raise CreateError("no command specified")
    for i, arg in enumerate(argv):
        if "\0" in arg:
            raise CreateError(f"argument {i} of the command contains a NUL byte")
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            raise CreateError(f"invalid environment variable name {name!r}: "
                              f"must be non-empty and contain no '=' or NUL")
        if "\0" in value:
            raise CreateError(f"environment variable {name}: value contains a NUL byte")


def check_program(argv: list[str], env: dict[str, str], cwd: str) -> None:
    """Raise StartError, in runc's words, if ARGV[0] cannot be executed. Containers
    run from the machine's own filesystem (no mount namespace), so looking here
    is looking where nsenter will."""
    program = argv[0]
    if "/" in program:
        path = program if os.path.isabs(program) else os.path.join(cwd, program)
        if not os.path.exists(path):
            raise StartError(f'exec: "{program}": stat {program}: no such file or directory')
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise StartError(f'exec: "{program}": permission denied')
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise StartError(f'exec: "{program}": executable file not found in $PATH')
    if not os.path.isdir(cwd):
        raise StartError(f'chdir to cwd ("{cwd}") set in config.json failed: no such file or directory')
