"""Network namespaces: create, enter, open netlink sockets in, run commands in.

Every kernel object netemu makes lives in a namespace it created. This module is
the only place that switches namespaces. Switching is per thread (setns(2) acts on
the calling thread only), so a daemon that enters its node's namespace at start-up
keeps the whole process there, while the orchestrator switches a worker thread in
and out as it builds.

Namespaces are registered under /run/netns exactly as `ip netns add` does, so
`ip netns exec NAME tcpdump -i docker0` works as on a real node.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence

NETNS_DIR = "/run/netns"
MNT_DETACH = 2
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 1 << 20
CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    pass


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def list_all() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def create(name: str, record: Callable[[int], None] | None = None) -> int:
    """Create a namespace and register it as NAME; returns its inode.

    Fails, touching nothing, if NAME is taken: the namespace is made first,
    unnamed, in a helper thread (unshare(2) acts on the calling thread only), its
    inode goes to RECORD (the cluster's journal), and only then is it given its
    name (attach, as `ip netns attach`), which refuses an existing name (O_EXCL). So the
    journal names every namespace before it can be seen, and never claims one it
    did not make: a crash before the attach leaves an inode that nothing under
    /run/netns has; a name taken by someone else keeps its own inode.
    """
    result: dict = {}

    def make() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            ino = os.stat("/proc/thread-self/ns/net").st_ino
            if record is not None:
                record(ino)
            attach(name, "/proc/thread-self/ns/net")
            result["inode"] = ino
        except BaseException as e:      # handed to the caller's thread
            result["error"] = e

    # The thread ends after the attach: its namespace lives on, held by the mount.
    thread = threading.Thread(target=make, name=f"netns-create-{name}")
    thread.start()
    try:
        thread.join()
    except BaseException:
        # Interrupted (a signal turned into an exception): the namespace may be
        # getting its name right now; wait, so that a rollback sees it.
        thread.join()
        raise
    if "error" in result:
        raise result["error"]
    return result["inode"]


def _mount(source: str, target: str, flags: int) -> int:
    """mount(2) with no filesystem type or data; 0, or the errno."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), b"none", ctypes.c_ulong(flags), None) != 0:
        return ctypes.get_errno()
    return 0


def attach(name: str, ns_file: str) -> None:
    """Give the network namespace at NS_FILE the name NAME: what `ip netns
    attach` does (iproute2's netns_add), in-process: /run/netns made a shared
    mount point (a bind mount of itself the first time), so that the names'
    mounts propagate between mount namespaces; the name's file created with
    O_EXCL (a taken name fails, touching nothing); the namespace bind-mounted
    on it. One `ip` process per namespace was ~5 ms of CPU, 1,100 times for
    a 100-node cluster of 1,000 pods."""
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
    made_mount_point = False
    while (err := _mount("", NETNS_DIR, MS_SHARED | MS_REC)) != 0:
        if err != errno.EINVAL or made_mount_point:
            raise NetnsError(f"cannot make {NETNS_DIR} a shared mount: {os.strerror(err)}")
        err = _mount(NETNS_DIR, NETNS_DIR, MS_BIND | MS_REC)
        if err != 0:
            raise NetnsError(f"cannot bind-mount {NETNS_DIR} on itself: {os.strerror(err)}")
        made_mount_point = True
    where = path(name)
    try:
        os.close(os.open(where, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise NetnsError(f"network namespace {name} already exists") from None
    except OSError as e:
        raise NetnsError(f"cannot create namespace file {where}: {e.strerror}") from None
    err = _mount(ns_file, where, MS_BIND)
    if err != 0:
        with contextlib.suppress(OSError):
            os.unlink(where)
        raise NetnsError(f"bind {ns_file} -> {where} failed: {os.strerror(err)}")


def delete(name: str, only_inode: int | None = None) -> bool:
    """Unregister a namespace (it vanishes when the last process/fd lets go).

    With ONLY_INODE, only if NAME still is that namespace: a name re-used by
    someone else since is left alone. True if something was deleted."""
    current = inode(name)
    if current is None or (only_inode is not None and current != only_inode):
        return False
    # What `ip netns delete` does (iproute2's delete_namespace): a lazy unmount
    # of the name's bind mount, then the file. Not one `ip` process per
    # namespace: those were 5.6 of the 9.9 s of a 100x10 `down` (py-spy).
    where = path(name)
    _libc.umount2(os.fsencode(where), MNT_DETACH)     # not mounted (half made): unlink alone
    try:
        os.unlink(where)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise NetnsError(f"deleting network namespace {name}: cannot remove {where}: {e.strerror}") from None
    return True


def inode(name: str) -> int | None:
    try:
        return os.stat(path(name)).st_ino
    except FileNotFoundError:
        return None


def setns_path(ns_path: str, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace at ns_path."""
    fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
    finally:
        os.close(fd)


_home_fd: int | None = None


def enter(name: str) -> None:
    """Move the calling thread into namespace NAME for good (daemons at start-up).
    The namespace it leaves (the machine's) stays reachable: home_fd()."""
    global _home_fd
    if _home_fd is None:
        _home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    setns_path(path(name))


def home_fd() -> int | None:
    """The network namespace this process started in (the machine's), held
    open since it entered another for good; None if it never did."""
    return _home_fd


def connect_in(ns: int | str, address: tuple[str, int], timeout: float):
    """A TCP connection (TCP_NODELAY: its users speak request/response) made
    from the network namespace NS, an open fd of it or its name (a socket
    belongs to the namespace it was made in, wherever it is used), by a
    short-lived thread, so no other thread moves."""
    import socket
    import threading

    result: dict = {}
    ns_fd = ns if isinstance(ns, int) else os.open(path(ns), os.O_RDONLY | os.O_CLOEXEC)

    def work() -> None:
        try:
            if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            result["sock"] = socket.create_connection(address, timeout)
        except BaseException as e:   # handed to the caller
            result["error"] = e

    thread = threading.Thread(target=work, name="connect-in-namespace")
    try:
        thread.start()
        thread.join()
    finally:
        if ns_fd is not ns:
            os.close(ns_fd)
    if "error" in result:
        raise result["error"]
    sock = result["sock"]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def http_connection(host: str, port: int, netns: int | str | None, timeout: float,
                    stream: bool = False):
    """An http.client connection whose socket is made, when it first
    connects, in the network namespace NETNS: an open fd of it, its name (the
    file is opened for the connect), or None (the calling thread's own). With
    STREAM the socket has no timeout once connected (a followed log may be
    quiet for long); TIMEOUT bounds the connect and, without STREAM, every read."""
    import http.client

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            if netns is None:
                super().connect()
            else:
                self.sock = connect_in(netns, (self.host, self.port), self.timeout)
            if stream:
                self.sock.settimeout(None)

    return Connection(host, port, timeout=timeout)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body of a with-block in namespace NAME, then return the thread home.

    The thread's original namespace is held open by fd, so it is restored even if
    it has no name (a daemon's node namespace, the machine's own one).
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(name)
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover - fatal
                err = ctypes.get_errno()
                os._exit(f"netemu: cannot return thread to its namespace: {os.strerror(err)}")
    finally:
        os.close(home)


def iproute(name: str | None = None):
    """An IPRoute netlink socket bound to namespace NAME (None: the current one).

    A netlink socket belongs to the namespace it was opened in, so we open it from
    inside and keep using it after the thread has gone home. This avoids pyroute2's
    own netns= mode, which forks a helper per socket (and creates the namespace if
    it is missing).
    """
    from pyroute2 import IPRoute

    if name is None:
        return IPRoute()
    with inside(name):
        return IPRoute()


def write_sysctl(name: str | None, key: str, value: str | int) -> None:
    """Set net sysctl KEY (dotted, e.g. net.ipv4.ip_forward) inside namespace NAME."""
    fname = "/proc/sys/" + key.replace(".", "/")
    ctx = inside(name) if name else contextlib.nullcontext()
    with ctx:
        with open(fname, "w") as f:
            f.write(f"{value}\n")


def read_sysctl(name: str | None, key: str) -> str:
    fname = "/proc/sys/" + key.replace(".", "/")
    ctx = inside(name) if name else contextlib.nullcontext()
    with ctx:
        with open(fname) as f:
            return f.read().strip()


def exec_argv(name: str, argv: Sequence[str], uts_pid: int | None = None) -> list[str]:
    """argv that runs ARGV inside namespace NAME (and the UTS namespace of UTS_PID).

    nsenter joins only the namespaces named, so the mount namespace stays the
    machine's: files written under /run/netemu are seen by everyone.
    """
    cmd = ["nsenter", f"--net={path(name)}"]
    if uts_pid:
        cmd.append(f"--uts=/proc/{uts_pid}/ns/uts")
    return cmd + ["--", *argv]


def run(name: str, argv: Sequence[str], check: bool = True, input: str | None = None,
        timeout: float | None = 60) -> subprocess.CompletedProcess:
    """Run a command inside namespace NAME and capture its output."""
    proc = subprocess.run(exec_argv(name, argv), capture_output=True, text=True,
                          input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"in {name}: {' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def current_is(name: str) -> bool:
    """Is the calling thread in namespace NAME (the one /run/netns/NAME names)?"""
    try:
        here, there = os.stat("/proc/thread-self/ns/net"), os.stat(path(name))
    except OSError:
        return False
    return (here.st_ino, here.st_dev) == (there.st_ino, there.st_dev)


def ip_batch(name: str, lines: Sequence[str]) -> None:
    """Run many `ip` commands in namespace NAME with one process (`ip -batch`).

    Through nsenter, not `ip -n`: ip's -n (as `ip netns exec`) also unshares a
    mount namespace to remount /sys, and the kernel copies every mount of the
    machine for it, each namespace under /run/netns among them: at 1,000 pods
    that copy was 11 % of the machine's CPU while a cluster came up (perf).
    The lines here speak netlink only and need no /sys of the namespace."""
    if not lines:
        return
    # A node agent makes its pods' veths from its node's namespace: no nsenter then.
    argv = ["ip", "-batch", "-"] if current_is(name) else exec_argv(name, ["ip", "-batch", "-"])
    proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsError(f"in {name}: ip -batch: {proc.stderr.strip()}")


