"""inotify, the little of it netemu uses: one non-blocking instance, watches
added and removed, and every pending event read at once. The SQLite store
watches its directory for writes to its WAL (store/sqlite.py: a process with
a shallow watch, the control plane; the agents' bells are FIFOs, since
instances are few: fs.inotify.max_user_instances per user, machine-wide); a
kubelet watches its containers' logs (node/logstamps.py)."""

from __future__ import annotations

import ctypes
import os
import struct

IN_MODIFY, IN_MOVED_TO, IN_CREATE = 0x2, 0x80, 0x100
_EVENT = struct.Struct("iIII")          # wd, mask, cookie, len; then the name


class Inotify:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd

    def add_watch(self, path: str, mask: int) -> int:
        """A watch descriptor for PATH; OSError naming PATH when the kernel refuses."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def rm_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)

    def drain(self) -> list[tuple[int, bytes]]:
        """Every pending event, as (watch descriptor, name: b"" for the watched
        file itself); [] when none is pending."""
        events = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            at = 0
            while at + _EVENT.size <= len(data):
                wd, _, _, length = _EVENT.unpack_from(data, at)
                start = at + _EVENT.size
                events.append((wd, data[start:start + length].split(b"\0", 1)[0]))
                at = start + length

    def close(self) -> None:
        os.close(self.fd)
