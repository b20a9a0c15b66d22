"""The cluster's journal: what it created, written down before it is created.

`netemu down` and `netemu clean` remove what the journal names and nothing else,
so a crash at any point (even kill -9 between the two steps) leaves nothing that
clean cannot find, and clean never touches another cluster's objects.
"""

from __future__ import annotations

import os

from netemu import names


def path(cluster: str) -> str:
    return os.path.join(names.state_dir(cluster), "journal")


def record(cluster: str, kind: str, name: str) -> None:
    # One short write with O_APPEND is atomic, so several processes (the builder,
    # kubelets) can share the file.
    fd = os.open(path(cluster), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {name}\n".encode())
    finally:
        os.close(fd)


def entries(cluster: str) -> list[tuple[str, str]]:
    try:
        with open(path(cluster)) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        kind, _, name = line.partition(" ")
        if name and (kind, name) not in out:
            out.append((kind, name))
    return out
