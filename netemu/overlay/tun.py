"""Open a TUN device (the kernel end of the udp backend's flannel0).

A TUN device belongs to the network namespace of the thread that issues
TUNSETIFF, so this must be called from a thread inside the node's namespace
(the overlay daemon's whole process is). The returned file descriptor can then
be used from anywhere. The device lives as long as the descriptor: closing it
removes flannel0, which is how the backend tears down.
"""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000      # no 4-byte packet-information prefix: reads and writes are bare IP
IFNAMSIZ = 16


def open_tun(name: str) -> int:
    """Create TUN device NAME (IFF_TUN | IFF_NO_PI) and return its fd (non-blocking, close-on-exec)."""
    if not name or len(name) >= IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r} (1-15 characters)")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifreq = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except BaseException:
        os.close(fd)
        raise
    return fd
