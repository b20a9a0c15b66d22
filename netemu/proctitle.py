"""A forked process's name, as ps and pgrep show it."""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15


def set_title(argv: list[str], name: str) -> None:
    """Show this forked process as ARGV in /proc/PID/cmdline (ps, pgrep -f) and
    as NAME in /proc/PID/comm: written over the command line the process was
    started with (as setproctitle does), so cut to that length. A forked
    process would otherwise look like the one it was forked from."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])       # arg_start, arg_end (fields 48, 49)
    raw = "\0".join(argv).encode()[:end - start - 1]
    ctypes.memmove(start, raw + b"\0" * (end - start - len(raw)), end - start)
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
