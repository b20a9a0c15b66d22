"""The cluster's journal: what it created, written down before it is created.

`netemu down` and `netemu clean` remove what the journal names and nothing else,
so a crash at any point (even kill -9 between the two steps) leaves nothing that
clean cannot find, and clean never touches another cluster's objects.

Lines, appended:
    netns NAME INODE        a network namespace (INODE: its nsfs inode, known
                            before the name is given, see netns.create)
    process PID START       a session leader the cluster started (the control
                            plane's supervisor); START (clock ticks after boot,
                            /proc/PID/stat field 22) tells it from a later
                            process that got the same pid
Ownership is by identity, not by name: a namespace is deleted only while its
name still leads to the recorded inode.
"""

from __future__ import annotations

import os

from netemu import names, netns


def path(cluster: str) -> str:
    return os.path.join(names.state_dir(cluster), "journal")


def record(cluster: str, kind: str, name: str) -> None:
    # One short write with O_APPEND is atomic, so several processes (the builder,
    # kubelets) can share the file.
    fd = os.open(path(cluster), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {name}\n".encode())
        # The journal must be on disk before what it names exists.
        os.fsync(fd)
    finally:
        os.close(fd)


def _lines(cluster: str) -> list[tuple[str, list[str]]]:
    try:
        with open(path(cluster)) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        kind, *fields = line.split()
        if fields:
            out.append((kind, fields))
    return out


def entries(cluster: str) -> list[tuple[str, str]]:
    """(kind, name) of every entry, in order, without repeats."""
    out = []
    for kind, fields in _lines(cluster):
        if (kind, fields[0]) not in out:
            out.append((kind, fields[0]))
    return out


def namespaces(cluster: str) -> list[tuple[str, int]]:
    """(name, inode) of every namespace the cluster made, in order of creation.
    A name appears once per namespace made under it (a pod re-created)."""
    return [(f[0], int(f[1])) for kind, f in _lines(cluster)
            if kind == "netns" and len(f) == 2 and f[1].isdigit()]


def processes(cluster: str) -> list[tuple[int, int]]:
    """(pid, start time) of every session leader the cluster started."""
    return [(int(f[0]), int(f[1])) for kind, f in _lines(cluster)
            if kind == "process" and len(f) == 2 and f[0].isdigit() and f[1].isdigit()]


def create_netns(cluster: str, name: str) -> int:
    """Create namespace NAME for CLUSTER, journalled by inode (see netns.create)."""
    return netns.create(name, record=lambda ino: record(cluster, "netns", f"{name} {ino}"))


def delete_netns(cluster: str, name: str) -> bool:
    """Delete namespace NAME if it is one CLUSTER made (its inode is journalled)."""
    current = netns.inode(name)
    if current is None or (name, current) not in namespaces(cluster):
        return False
    return netns.delete(name, only_inode=current)


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time) of PID from /proc/PID/stat (fields 3,
    6 and 22; the command name before them may hold spaces and parentheses),
    None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[3]), int(fields[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """PID's start time (clock ticks since boot), exited or not; None: no such process."""
    st = process_stat(pid)
    return st[2] if st else None


def running(pid: int, start: int | None = None) -> bool:
    """PID is a process that has not exited (a zombie waiting for its parent
    has) and, given START, the one that started then (not a re-used pid)."""
    st = process_stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (start is None or st[2] == start)


def record_process(cluster: str, pid: int) -> None:
    start = process_start_time(pid)
    if start is not None:
        record(cluster, "process", f"{pid} {start}")
