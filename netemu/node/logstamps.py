"""When each line of a container's log was written: what `kubectl logs
--timestamps` and `--since` read.

A container's stdout and stderr go straight into its log file (no relay
process the kubelet would have to keep alive across its own restarts), so the
file itself has no times. Beside it the kubelet keeps a times file
(names.container_log_times): one record "END_OFFSET UNIX_NANOSECONDS" each time
it sees the log grow, meaning "the log was END_OFFSET bytes long by then". A
line's time is that of the first record past the line's first byte: when the
kubelet first saw it, within STAMP_INTERVAL of its write while the kubelet runs
(bytes written while no kubelet ran get the time it came back). A reader that
shows lines before the kubelet has stamped them shows its own time and adds
that record (StampFile.observe), so a line's time, once shown, never changes.

The kubelet watches its containers' logs with one inotify instance (LogStamper):
a quiet container costs nothing, a chatty one at most one record per interval.
Instances are few (fs.inotify.max_user_instances, 128 by default, counts every
process of the user machine-wide: one per agent): a kubelet that gets none
looks at its logs' sizes every POLL_INTERVAL instead, its lines stamped to
within that. Readers (the API server) use read_stamps and line_times, pure
functions.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import logging
import os
import time

from netemu.inotify import IN_MODIFY, Inotify

log = logging.getLogger("netemu.kubelet")

STAMP_INTERVAL = 0.01           # seconds: how long the stamper lets writes gather
POLL_INTERVAL = 0.1             # seconds: between looks at every log, without inotify


def read_stamps(path: str) -> tuple[list[int], list[int]]:
    """(end offsets, nanosecond times) of a times file, both ascending; empty
    when there is none. A torn last record (a write in progress) is skipped."""
    return StampFile(path).refresh()


def line_times(data: bytes, base: int, stamps: tuple[list[int], list[int]],
               unknown: int) -> list[tuple[bytes, int]]:
    """DATA (the log from byte offset BASE) as (line, time in ns) pairs, each
    line with its newline if it has one. A line past the last record (the
    kubelet has not seen it yet) gets UNKNOWN, the reader's own time."""
    ends, times = stamps
    out = []
    at = 0
    for line in data.splitlines(keepends=True):
        i = bisect.bisect_right(ends, base + at)
        out.append((line, times[i] if i < len(times) else unknown))
        at += len(line)
    return out


def rfc3339nano(ns: int) -> str:
    """Go's time.RFC3339Nano in UTC, as the kubelet prints log timestamps:
    nanoseconds with trailing zeros dropped (2024-05-01T10:00:00.12Z)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def parse_rfc3339(text: str) -> int:
    """An RFC 3339 time (sinceTime) -> ns since the epoch; ValueError if it is not one."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    frac_ns = 0
    if "." in value:
        head, _, rest = value.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        if not digits or len(digits) > 9:
            raise ValueError(text)
        frac_ns = int(digits.ljust(9, "0"))
        value = head + rest
    parsed = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S%z")
    return int(parsed.timestamp()) * 1_000_000_000 + frac_ns


class Stamp:
    """The times file of one running container instance."""

    def __init__(self, log_path: str, times_path: str):
        self.log_path, self.times_path = log_path, times_path
        ends, _ = read_stamps(times_path)
        self.size = ends[-1] if ends else 0

    def stamp(self) -> None:
        try:
            size = os.stat(self.log_path).st_size
        except OSError:
            return                  # its pod folder is gone
        if size > self.size:
            with contextlib.suppress(OSError), open(self.times_path, "a") as f:
                f.write(f"{size} {time.time_ns()}\n")
            self.size = size


class LogStamper:
    """One kubelet's watch over its containers' logs: one inotify instance, or
    a look at every log's size each POLL_INTERVAL when the kernel gives none."""

    def __init__(self) -> None:
        try:
            self.inotify: Inotify | None = Inotify()
        except OSError as err:
            log.warning("no inotify instance for container logs (%s; fs.inotify.max_user_instances "
                        "counts every process of this user): their lines are stamped by looking "
                        "at their sizes every %g s", err.strerror or err, POLL_INTERVAL)
            self.inotify = None
        self.by_wd: dict[int, Stamp] = {}
        self.polled: list[Stamp] = []
        self._some_polled = None      # a trio.Event while _poll sleeps for want of logs

    def add(self, log_path: str, times_path: str) -> Stamp:
        """Watch LOG_PATH from now on (its bytes so far are stamped now)."""
        st = Stamp(log_path, times_path)
        st.stamp()
        if self.inotify is not None:
            try:
                self.by_wd[self.inotify.add_watch(log_path, IN_MODIFY)] = st
                return st
            except OSError as err:
                log.warning("%s: no inotify watch (%s): its lines are stamped every %g s",
                            log_path, err.strerror, POLL_INTERVAL)
        self.polled.append(st)
        if self._some_polled is not None:
            self._some_polled.set()
        return st

    def remove(self, st: Stamp | None) -> None:
        """The instance ended: its last bytes are stamped, the watch goes."""
        if st is None:
            return
        st.stamp()
        if st in self.polled:
            self.polled.remove(st)
        for wd, other in list(self.by_wd.items()):
            if other is st:
                del self.by_wd[wd]
                if self.inotify is not None:
                    self.inotify.rm_watch(wd)

    async def run(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll)
            if self.inotify is not None:
                nursery.start_soon(self._watch, self.inotify)

    async def _watch(self, inotify: Inotify) -> None:
        import trio

        try:
            while True:
                await trio.lowlevel.wait_readable(inotify.fd)
                # Let a burst of writes land: one record for all of it.
                await trio.sleep(STAMP_INTERVAL)
                for wd in {wd for wd, _ in inotify.drain()}:
                    st = self.by_wd.get(wd)
                    if st is not None:
                        st.stamp()
        finally:
            inotify.close()

    async def _poll(self) -> None:
        """The logs no watch covers: asleep while there are none."""
        import trio

        while True:
            if self.polled:
                await trio.sleep(POLL_INTERVAL)
            else:
                self._some_polled = trio.Event()
                await self._some_polled.wait()
            for st in list(self.polled):
                st.stamp()


class StampFile:
    """A times file read as it grows (a followed log's)."""

    def __init__(self, path: str):
        self.path = path
        self.ends: list[int] = []
        self.times: list[int] = []
        self._read = 0                  # bytes of the file taken in (whole records)

    def refresh(self) -> tuple[list[int], list[int]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._read)
                data = f.read()
        except FileNotFoundError:
            return self.ends, self.times
        whole = data.rfind(b"\n") + 1
        self._read += whole
        for line in data[:whole].split(b"\n")[:-1]:
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                end, at = int(parts[0]), int(parts[1])
                if not self.ends or end > self.ends[-1]:
                    self.ends.append(end)
                    self.times.append(at)
        return self.ends, self.times

    def observe(self, end: int, ns: int) -> None:
        """A reader saw the log END bytes long at NS and showed its newest
        lines with that time (the kubelet had not stamped them yet): the time
        is recorded, so that every later reader shows those lines with the
        same one. The kubelet's own record of that growth, a moment later,
        then adds nothing (its end is no greater)."""
        if self.ends and end <= self.ends[-1]:
            return
        # One short O_APPEND write: whole among the kubelet's own.
        with contextlib.suppress(OSError), open(self.path, "a") as f:
            f.write(f"{end} {ns}\n")
