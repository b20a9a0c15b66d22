"""Running tcpdump at any hop: inside the network namespace of a node, a pod or the
fabric, on one of its interfaces (or `any`).

Three ways to use it:
- `capture(ns, iface, pcap_path)`: a context manager that writes a pcap file while
  the with-block runs (tests, benchmarks, `netemu trace`). It returns only once
  tcpdump is really listening, and on exit stops it so the file is complete; no
  tcpdump survives the block, whatever happens inside it.
- `run_live(ns, iface, ...)`: tcpdump in the foreground for the CLI, its text on
  the terminal, Ctrl-C passed through cleanly, `duration` enforced by a timer.
- `live_decoded(ns, iface, ...)`: tcpdump writes pcap to a pipe and we decode as
  packets arrive, to show the pod traffic inside the encapsulation live.

tcpdump runs under nsenter (netemu.netns.exec_argv), which execs it: the process we
start is tcpdump itself, so our signals reach it directly. A namespace of None is
this process's own (the machine's, for the outer layer of a machine tunnel):
tcpdump runs there directly, and only reads.

Facts that shape the argv (see /work/shared/REFERENCE.md):
- tcpdump drops privileges to user `tcpdump`, who may not be allowed to write the
  output file: `-Z root` keeps it root (the capture stays inside our namespace).
- `-U` flushes the file after every packet, so a reader sees packets while the
  capture runs and nothing is lost if tcpdump has to be killed.
- `--immediate-mode` hands each packet over as it arrives instead of when the
  kernel's ring block fills or times out; without it the last packets before a stop
  may never reach the file.
- `-c N` that is never reached never exits: every wait here has a deadline.
- tcpdump puts the interface in promiscuous mode unless told `-p`. On a bridge
  (docker0) with br_netfilter that changes what happens to packets: a promiscuous
  bridge also passes every forwarded frame up to its own IP stack, where a frame
  that DNAT rewrote in the bridge (a pod reaching a Service whose endpoint is on
  the same node) is routed a second time and delivered twice. Observers that must
  not disturb the path (`netemu trace`) pass promiscuous=False.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO

from netemu import netns

TCPDUMP = "tcpdump"
START_TIMEOUT = 10.0    # seconds to wait for "listening on"
STOP_TIMEOUT = 5.0      # seconds between SIGINT and SIGKILL
DRAIN_QUIET = 0.1       # the pcap file unchanged this long: tcpdump has caught up
DRAIN_LIMIT = 1.0       # but never wait longer than this for it (busy links)
# Kernel capture buffer (tcpdump -B, KiB). tcpdump's default 2 MiB lost half of a
# 20,000-datagram burst on this 2-core machine; 64 MiB lost 0-6 %.
BUFFER_KIB = 65536


class CaptureError(RuntimeError):
    pass


def in_namespace(ns: str | None, argv: list[str]) -> list[str]:
    """ARGV run in namespace NS (None: in this process's own)."""
    return list(argv) if ns is None else netns.exec_argv(ns, argv)


def tcpdump_argv(iface: str = "any", pcap_path: str | None = None,
                 bpf_filter: str | Sequence[str] | None = None, *, count: int | None = None,
                 snaplen: int | None = None, line_buffered: bool = False,
                 immediate: bool = True, verbose: bool = False,
                 buffer_kib: int | None = None, promiscuous: bool = True) -> list[str]:
    """tcpdump's own argv (run it in a namespace with netns.exec_argv).

    pcap_path "-" writes the pcap stream to stdout. bpf_filter is a filter
    expression as one string ("udp port 8285") or as words.
    """
    argv = [TCPDUMP, "-i", iface, "-n", "-Z", "root"]
    if not promiscuous:
        argv.append("-p")
    if immediate:
        argv.append("--immediate-mode")
    if pcap_path is not None:
        argv += ["-U", "-w", pcap_path]
    if line_buffered:
        argv.append("-l")
    if verbose:
        argv.append("-v")
    if count is not None:
        if count <= 0:
            raise ValueError(f"count must be positive, not {count}")
        argv += ["-c", str(count)]
    if snaplen is not None:
        argv += ["-s", str(snaplen)]
    if buffer_kib is not None:
        argv += ["-B", str(buffer_kib)]
    if bpf_filter:
        argv += [bpf_filter] if isinstance(bpf_filter, str) else list(bpf_filter)
    return argv


_STAT_RE = re.compile(r"^(\d+) packets? (captured|received by filter|dropped by kernel)")
_STAT_NAMES = {"captured": "captured", "received by filter": "received", "dropped by kernel": "dropped"}


def parse_stats(stderr: str) -> dict[str, int]:
    """tcpdump's closing lines ("12 packets captured", "12 packets received by
    filter", "0 packets dropped by kernel") as {captured, received, dropped}."""
    stats = {}
    for line in stderr.splitlines():
        m = _STAT_RE.match(line.strip())
        if m:
            stats[_STAT_NAMES[m.group(2)]] = int(m.group(1))
    return stats


def _wait_drained(proc: subprocess.Popen, pcap_path: str, quiet: float = DRAIN_QUIET,
                  limit: float = DRAIN_LIMIT) -> None:
    """Give tcpdump time to write what the kernel already handed it.

    On SIGINT tcpdump only breaks out of its loop (pcap_breakloop): packets still
    in the capture ring are not written. A packet is in the ring as soon as it was
    sent, but tcpdump writes it a little later; with -U each packet is flushed to
    the file, so a file that stopped growing means tcpdump has caught up.
    """
    deadline = time.monotonic() + limit
    last, since = -1, time.monotonic()
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            size = os.stat(pcap_path).st_size
        except FileNotFoundError:
            size = -1
        now = time.monotonic()
        if size != last:
            last, since = size, now
        elif now - since >= quiet:
            return
        time.sleep(quiet / 4)


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGINT (tcpdump then flushes and closes its file), SIGKILL if it lingers;
    returns once the process is reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@dataclasses.dataclass
class Capture:
    """A running (then finished) tcpdump writing a pcap file, or with pcap_path
    "-" a pcap stream that packets() decodes as it arrives."""

    ns: str | None
    iface: str
    pcap_path: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    stderr_lines: list[str] = dataclasses.field(default_factory=list)
    returncode: int | None = None

    def __post_init__(self) -> None:
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def streaming(self) -> bool:
        return self.pcap_path == "-"

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def packets(self):
        """Decoded packets from a streaming capture ("-"), as tcpdump hands them
        over; ends when tcpdump exits (count reached, stop(), a timer)."""
        from netemu.capture import decode  # scapy costs ~0.3 s: only when decoding

        if not self.streaming or self.proc is None or self.proc.stdout is None:
            raise CaptureError("packets() needs a running capture to '-'")
        for pkt in decode.read_pcap(self.proc.stdout):
            yield from decode.decode_packets(pkt)

    @property
    def stats(self) -> dict[str, int]:
        return parse_stats(self.stderr)

    def _drain_stderr(self) -> None:
        # Runs until tcpdump closes stderr (it exits). Reading all of it keeps the
        # pipe from filling up and gives us the closing statistics.
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.stderr_lines.append(line)
            if "listening on" in line:
                self._listening.set()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start tcpdump and return once it listens (its socket is open and the
        filter set: every packet from now on is captured)."""
        stdout = subprocess.PIPE if self.streaming else subprocess.DEVNULL
        self.proc = subprocess.Popen(in_namespace(self.ns, self.argv), stdin=subprocess.DEVNULL,
                                     stdout=stdout, stderr=subprocess.PIPE,
                                     start_new_session=True)  # a terminal's Ctrl-C is ours to pass on
        self._reader = threading.Thread(target=self._drain_stderr, daemon=True,
                                        name=f"tcpdump-stderr-{self.proc.pid}")
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            exited = self.proc.poll() is not None
            if exited:
                # It may have listened, caught `count` packets and quit at once.
                self._reader.join(1.0)
                if self._listening.is_set():
                    break
            if exited or time.monotonic() > deadline:
                self.stop()
                why = (f"exited with status {self.returncode}" if exited
                       else f"was not listening after {timeout:g} s")
                raise CaptureError(f"tcpdump in {self.ns or 'this machine'} on {self.iface} {why}: "
                                   f"{self.stderr.strip() or 'no output'}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop tcpdump (idempotent); the pcap file is complete afterwards."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self._listening.is_set() and not self.streaming:
            _wait_drained(self.proc, self.pcap_path)
        if self.streaming and self.proc.poll() is None:
            # Nobody may be reading any more: tcpdump blocked on a full pipe would
            # not see SIGINT until it can write. A closed pipe ends it (EPIPE).
            self.proc.send_signal(signal.SIGINT)
            self.proc.stdout.close()
        _stop(self.proc, timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.returncode = self.proc.returncode
        if self._reader is not None:
            self._reader.join(timeout)
        if self.proc.stderr is not None and not (self._reader and self._reader.is_alive()):
            self.proc.stderr.close()


@contextlib.contextmanager
def capture(ns: str, iface: str, pcap_path: str, bpf_filter: str | Sequence[str] | None = None, *,
            count: int | None = None, snaplen: int | None = None, buffer_kib: int | None = BUFFER_KIB,
            start_timeout: float = START_TIMEOUT, stop_timeout: float = STOP_TIMEOUT,
            promiscuous: bool = True) -> Iterator[Capture]:
    """Capture on IFACE in namespace NS into PCAP_PATH while the with-block runs.

    The block starts only once tcpdump listens; on leaving it (normally or by an
    exception) tcpdump gets SIGINT, then SIGKILL after stop_timeout, and is reaped.
    Capture.stats holds tcpdump's own counts afterwards: check `dropped` after a
    burst (the kernel drops what tcpdump's buffer, buffer_kib, cannot hold).
    """
    cap = Capture(ns=ns, iface=iface, pcap_path=pcap_path,
                  argv=tcpdump_argv(iface, pcap_path, bpf_filter, count=count, snaplen=snaplen,
                                    buffer_kib=buffer_kib, promiscuous=promiscuous))
    try:
        cap.start(start_timeout)
        yield cap
    finally:
        cap.stop(stop_timeout)


@contextlib.contextmanager
def _forward_sigint(proc: subprocess.Popen) -> Iterator[None]:
    """While the body runs, a SIGINT to us (Ctrl-C) becomes one SIGINT to tcpdump,
    instead of a KeyboardInterrupt that would abandon it mid-write. Only the main
    thread may set signal handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: proc.poll() is None
                             and proc.send_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_live(ns: str, iface: str = "any", bpf_filter: str | Sequence[str] | None = None, *,
             pcap_path: str | None = None, count: int | None = None, duration: float | None = None,
             snaplen: int | None = None, verbose: bool = False, stdout: IO | None = None,
             stop_timeout: float = STOP_TIMEOUT, promiscuous: bool = True) -> int:
    """tcpdump in the foreground (the CLI's live mode); returns its exit status.

    Its text goes to STDOUT (default: ours, line-buffered). tcpdump runs in its own
    process group so that a terminal's Ctrl-C reaches only us, and we forward it
    once; DURATION seconds after the start it gets SIGINT as well (tcpdump's own
    `-c` may never be reached). It then prints its statistics and exits.
    """
    argv = tcpdump_argv(iface, pcap_path, bpf_filter, count=count, snaplen=snaplen,
                        line_buffered=pcap_path is None, verbose=verbose, promiscuous=promiscuous)
    proc = subprocess.Popen(in_namespace(ns, argv), stdin=subprocess.DEVNULL, stdout=stdout,
                            process_group=0)
    try:
        with _forward_sigint(proc):
            try:
                proc.wait(duration)
            except subprocess.TimeoutExpired:
                pass    # duration is up: _stop sends the SIGINT
    finally:
        _stop(proc, stop_timeout)
    return proc.returncode


@dataclasses.dataclass(frozen=True)
class Layer:
    """One of the tcpdumps run_layers runs side by side."""

    label: str                   # heads each of its lines: "inner m-b"
    ns: str | None               # None: this process's own namespace
    iface: str
    bpf_filter: str | Sequence[str] | None = None
    pcap_path: str | None = None
    promiscuous: bool = True


def run_layers(layers: Sequence[Layer], *, count: int | None = None, duration: float | None = None,
               stdout: IO | None = None, stderr: IO | None = None,
               stop_timeout: float = STOP_TIMEOUT) -> list[int]:
    """Several tcpdumps in the foreground at once (the two layers of a machine
    tunnel); returns their exit statuses.

    Each line a tcpdump prints (its packets on STDOUT, its "listening on" and
    closing counts on STDERR) is headed by its layer's label, the layers' lines
    interleaved as they come. A layer with a pcap_path writes that file instead
    of packet lines. COUNT stops each tcpdump after that many packets of its
    own; DURATION, or Ctrl-C (forwarded once to each), stops them all.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    width = max(len(layer.label) for layer in layers)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []

    def relay(pipe, label: str, sink) -> None:
        for raw in pipe:
            if not raw.strip():
                continue    # the empty line tcpdump ends its output with on SIGINT
            with lock:
                sink.write(f"{label:<{width}} | {raw.decode(errors='replace')}")
                sink.flush()

    def forward_sigint(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, forward_sigint)
    try:
        for layer in layers:
            argv = tcpdump_argv(layer.iface, layer.pcap_path, layer.bpf_filter, count=count,
                                line_buffered=layer.pcap_path is None, promiscuous=layer.promiscuous)
            proc = subprocess.Popen(in_namespace(layer.ns, argv), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if layer.pcap_path is None else subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, process_group=0)
            procs.append(proc)
            pipes = [(proc.stderr, err)] + ([(proc.stdout, out)] if layer.pcap_path is None else [])
            for pipe, sink in pipes:
                t = threading.Thread(target=relay, args=(pipe, layer.label, sink), daemon=True)
                t.start()
                readers.append(t)
        deadline = None if duration is None else time.monotonic() + duration
        for proc in procs:
            try:
                proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break   # duration is up: _stop below sends the SIGINTs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            _stop(proc, stop_timeout)
        for t in readers:
            t.join(stop_timeout)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return [p.returncode for p in procs]


def live_decoded(ns: str, iface: str = "any", bpf_filter: str | Sequence[str] | None = None, *,
                 count: int | None = None, duration: float | None = None,
                 snaplen: int | None = None, buffer_kib: int | None = BUFFER_KIB,
                 stop_timeout: float = STOP_TIMEOUT, promiscuous: bool = True):
    """Decoded packets as tcpdump captures them (pcap through a pipe), so the CLI
    can show what is inside flannel's encapsulation live.

    A generator: closing it (or leaving a for-loop early) stops tcpdump. DURATION
    bounds the capture with a timer that sends tcpdump SIGINT; `count` stops it
    after that many packets.
    """
    with capture(ns, iface, "-", bpf_filter, count=count, snaplen=snaplen,
                 buffer_kib=buffer_kib, stop_timeout=stop_timeout, promiscuous=promiscuous) as cap:
        timer = None
        if duration is not None:
            proc = cap.proc
            timer = threading.Timer(duration, lambda: proc.poll() is None
                                    and proc.send_signal(signal.SIGINT))
            timer.daemon = True
            timer.start()
        try:
            yield from cap.packets()
        finally:
            if timer is not None:
                timer.cancel()
