"""netemu's own delay line: delay and jitter on a kernel without netem.

One process per delayed link end, in that end's namespace. The end's nft egress
chain (netemu.impairment.nft_ruleset) forwards every frame to a tap device of
its own (`fwd to "dly..."`); this process reads the frames from the tap, holds
each until its time has come, and sends it out of the end itself through a
packet socket whose frames carry DELAY_MARK, which the chain lets pass. The
frame then goes through the end's root qdisc (the rate) as any other.

Delayed frames keep their order: one is never sent before the one delayed
before it (as netem with a rate), so jitter spreads the delay but does not
reorder. The delay of each frame is uniform in [delay - jitter, delay + jitter]
(netem's default without a distribution table), never below zero. With
REORDER (per million) that share of frames is sent at once, ahead of those
held: netem's `reorder` without its correlation.

    python -m netemu.delayline TAP DEVICE DELAY_US JITTER_US REORDER_PPM

runs in the foreground, prints "ready" once it is attached to the tap, and ends
on SIGTERM. Its end is dead while it does not run: the tap's queue fills and
drops, as a cut cable.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import random
import select
import signal
import socket
import struct
import sys
import time

from netemu.impairment import DELAY_MARK

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
# select() wakes up late by tens of microseconds on a busy machine; the last
# SPIN seconds before a frame is due are waited by polling instead.
SPIN = 0.0002


class Schedule:
    """When each frame leaves (pure: the clock is given)."""

    def __init__(self, delay: float, jitter: float, reorder: float = 0.0, rand=random.random):
        self.delay, self.jitter, self.reorder, self.rand = delay, jitter, reorder, rand
        self.last = 0.0

    def due(self, now: float) -> float | None:
        """When a frame read at NOW leaves; None: at once, ahead of the others."""
        if self.reorder and self.rand() < self.reorder:
            return None
        d = self.delay + (2 * self.rand() - 1) * self.jitter if self.jitter else self.delay
        # Never before the frame read before it: jitter does not reorder.
        self.last = max(now + max(d, 0.0), self.last)
        return self.last


def attach(tap: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def send(out: socket.socket, frame: bytes) -> None:
    try:
        out.send(frame)
    except OSError:
        pass            # the device's queue is full: the frame is lost, as on a wire


def run(tap: str, device: str, delay: float, jitter: float, reorder: float) -> None:
    # Real-time priority (the lowest): netem holds frames in the kernel's
    # timers; a userspace line on a busy machine is otherwise woken up
    # milliseconds late. Measured on 2 busy cores, 10 ms each way: mean RTT
    # 21.26 ms as a normal process, 20.32 ms with this (base RTT 0.1 ms). The
    # kernel's real-time throttling keeps a saturated line from taking a whole
    # core; the polling before a frame is due is at most SPIN long.
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    fd = attach(tap)
    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, DELAY_MARK)
    out.bind((device, 0))
    schedule = Schedule(delay, jitter, reorder)
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            send(out, queue.popleft()[1])
        wait = None if not queue else max(0.0, queue[0][0] - now - SPIN)
        readable, _, _ = select.select([fd], [], [], wait)
        if readable:
            while True:             # everything the tap holds, stamped with one clock read
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                due = schedule.due(time.monotonic())
                if due is None:
                    send(out, frame)
                else:
                    queue.append((due, frame))
        elif queue:
            while time.monotonic() < queue[0][0]:
                pass


def main(argv: list[str]) -> int:
    tap, device, delay_us, jitter_us, reorder_ppm = argv
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(tap, device, int(delay_us) / 1e6, int(jitter_us) / 1e6, int(reorder_ppm) / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
