"""One cluster over several machines: which machine this is, and the fabric's
tunnels between machines.

A cluster with `machines:` keeps its state in an etcd every machine reaches.
The first machine runs `netemu up` (control plane, its nodes, the external
client and the load balancer); every other machine runs `netemu join`, which
builds its own nodes and runs their agents. Each machine writes what it is to
<state>/machine.json, which the control plane's parts read.

The fabric (the emulated datacenter network, fabric.py) is one layer-2 network
over all machines: each machine's fabric bridge has one VXLAN port per other
machine ("m-<machine>"), point to point between the two machines' addresses on
UDP port MACHINE_PORT. The port lives in the fabric's namespace, but its UDP
socket is made in the namespace of the process that creates it: the machine's
own. That socket (the kernel's VXLAN socket on MACHINE_PORT, bound to every
address) is all a cluster adds to a machine's own namespace for the tunnels; it
goes with the fabric namespace. Every pair of machines has its own VNI (the
kernel takes one VNI once per UDP port and namespace), and the tunnel ports are
bridge ports "isolated" from each other: a frame that came from one machine is
never sent on to another (the full mesh would otherwise loop).

Each machine's control plane supervisor keeps a key of its own alive in the
store (MACHINES_PREFIX + name, a TTL key), so that `down` on any machine knows
when every other machine has removed what it made.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import time

from netemu import names, netns
from netemu.topology.loader import MACHINE_TUNNEL_OVERHEAD

MACHINE_PORT = 4789                 # IANA's VXLAN port, on the machines' network
MACHINES_PREFIX = "/netemu.io/machines/"
MACHINE_TTL = 10.0                  # seconds; renewed every MACHINE_RENEW
VNI_FREE_WAIT = 5.0                 # seconds a VNI of a just-deleted namespace may take to be freed
MACHINE_RENEW = 3.0
VNI_SPACE = 2 ** 24 - 2             # VNIs 1 .. 2**24-2


class MachineError(RuntimeError):
    """One line: what is wrong with this machine's part of a cluster."""


# -- which machine this is ------------------------------------------------------

def info_path(cluster: str) -> str:
    return os.path.join(names.state_dir(cluster), "machine.json")


def write_info(cluster: str, machine: str, first: bool) -> None:
    tmp = info_path(cluster) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"name": machine, "first": first}, f)
    os.replace(tmp, info_path(cluster))


def info(cluster: str) -> dict | None:
    """{"name", "first"} of this machine in CLUSTER; None: a cluster on one machine."""
    try:
        with open(info_path(cluster)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise MachineError(f"{info_path(cluster)}: not a machine description netemu wrote")
    return data


def name(cluster: str) -> str | None:
    """This machine's name in CLUSTER (None: a cluster on one machine)."""
    data = info(cluster)
    return data["name"] if data else None


def runs_control_plane(cluster: str) -> bool:
    """Whether this machine runs CLUSTER's control plane (the first machine, or
    the only one)."""
    data = info(cluster)
    return data is None or bool(data.get("first"))


def local_addresses() -> set[ipaddress.IPv4Address]:
    """The IPv4 addresses of this process's network namespace (read only)."""
    ipr = netns.iproute()
    try:
        return {ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET)}
    finally:
        ipr.close()


def check_here(topology, machine) -> None:
    """MACHINE (a MachineSpec) must be this machine: its address one of ours."""
    if machine.address not in local_addresses():
        raise MachineError(f"machine {machine.name}'s address {machine.address} (machines: in the "
                           f"topology) is not an address of this machine: run this on {machine.name}")


# -- the tunnels ------------------------------------------------------------------

def pair_vni(cluster: str, machines: list, a: str, b: str) -> int:
    """The VNI of the tunnel between machines A and B: the same on both ends,
    different for every pair of the cluster, and spread by the cluster's name so
    that two clusters over the same machines are unlikely to collide (when they
    do, the kernel refuses the second and `up` says so)."""
    order = [m.name for m in machines]
    i, j = sorted((order.index(a), order.index(b)))
    base = int(hashlib.sha256(cluster.encode()).hexdigest()[:6], 16)
    return 1 + (base + i * len(order) + j) % VNI_SPACE


def link_mtu_towards(address: ipaddress.IPv4Address) -> tuple[str, int]:
    """(interface, MTU) of this namespace's route to ADDRESS (the route's own
    mtu when it has one)."""
    ipr = netns.iproute()
    try:
        try:
            route = ipr.route("get", dst=str(address))[0]
        except Exception as e:      # pyroute2's NetlinkError: no route
            raise MachineError(f"no route from this machine to {address}: {e}") from None
        oif = route.get_attr("RTA_OIF")
        link = ipr.get_links(oif)[0]
        mtu = link.get_attr("IFLA_MTU")
        metrics = route.get_attr("RTA_METRICS")
        if metrics is not None and metrics.get_attr("RTAX_MTU"):
            mtu = min(mtu, metrics.get_attr("RTAX_MTU"))
        return link.get_attr("IFLA_IFNAME"), mtu
    finally:
        ipr.close()


def tunnel_plan(cluster: str, topology, here: str) -> list[tuple[str, str, ipaddress.IPv4Address, int]]:
    """(peer machine, port name, peer address, VNI) for every other machine."""
    return [(m.name, names.machine_port(m.name), m.address, pair_vni(cluster, topology.machines, here, m.name))
            for m in topology.machines if m.name != here]


def create_tunnels(cluster: str, topology, here: str, progress=lambda s: None) -> None:
    """The fabric's port to every other machine (see the module's docstring).
    The fabric namespace exists; this process is in the machine's own."""
    mtu = topology.settings.underlay_mtu
    me = topology.machine(here)
    fabric = names.fabric_ns(cluster)
    for peer, port, address, vni in tunnel_plan(cluster, topology, here):
        dev, link_mtu = link_mtu_towards(address)
        if link_mtu < mtu + MACHINE_TUNNEL_OVERHEAD:
            raise MachineError(
                f"the link to machine {peer} ({address}, via {dev}) has MTU {link_mtu}: the fabric's "
                f"{mtu}-byte frames need {mtu + MACHINE_TUNNEL_OVERHEAD} in VXLAN; set cluster.underlayMTU "
                f"to {link_mtu - MACHINE_TUNNEL_OVERHEAD} or less in the topology, or raise {dev}'s MTU")
        # Made from here (the machine's namespace keeps the UDP socket), put
        # straight into the fabric's: nothing appears among the machine's links.
        # The kernel frees a deleted namespace's devices (and their VNIs) a
        # little after the namespace goes (cleanup_net runs deferred): a part
        # of this cluster removed just before (join resuming) may hold the VNI
        # for a moment; wait for it, VNI_FREE_WAIT at most.
        deadline = time.monotonic() + VNI_FREE_WAIT
        while True:
            proc = subprocess.run(
                ["ip", "link", "add", port, "netns", netns.path(fabric), "mtu", str(mtu), "type", "vxlan",
                 "id", str(vni), "local", str(me.address), "remote", str(address), "dstport", str(MACHINE_PORT)],
                capture_output=True, text=True)
            if proc.returncode == 0 or "VNI already exists" not in proc.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if proc.returncode != 0:
            raise MachineError(f"tunnel to machine {peer} ({address}, VNI {vni}, UDP {MACHINE_PORT}): "
                               f"{proc.stderr.strip()}")
        netns.ip_batch(fabric, [f"link set {port} master {names.FABRIC_BRIDGE}",
                                f"link set dev {port} type bridge_slave isolated on",
                                f"link set {port} up"])
        progress(f"tunnel {port} to machine {peer}: VXLAN {vni} {me.address} -> {address}:{MACHINE_PORT}")


def remove_tunnels(cluster: str) -> None:
    """Delete the fabric's tunnel ports (teardown, before the namespaces go).
    A deleted namespace's devices are freed a little later (cleanup_net runs
    deferred), and with the last of them the kernel's VXLAN socket on
    MACHINE_PORT in this machine's own namespace: deleted here, that socket is
    gone when teardown returns. Only the fabric namespace the journal recorded,
    while its name still leads to it."""
    from netemu import journal

    fabric = names.fabric_ns(cluster)
    recorded = [ino for ns, ino in journal.namespaces(cluster) if ns == fabric]
    if not recorded or netns.inode(fabric) != recorded[-1]:
        return
    listed = netns.run(fabric, ["ip", "-j", "link", "show", "type", "vxlan"], check=False).stdout
    ports = [link["ifname"] for link in json.loads(listed or "[]")]
    netns.ip_batch(fabric, [f"link del {port}" for port in ports if port.startswith("m-")])


# -- the machines' keys in the store ---------------------------------------------------

def key(machine: str) -> str:
    return MACHINES_PREFIX + machine


def announce(store, cluster: str, machine: str) -> None:
    """Say (again) that MACHINE is part of CLUSTER and alive: a TTL key."""
    store.put(key(machine), {"machine": machine, "host": socket.gethostname(), "pid": os.getpid()},
              ttl=MACHINE_TTL)


def present(store) -> list[str]:
    """The machines whose key is alive."""
    return sorted(kv.key[len(MACHINES_PREFIX):] for kv in store.list(MACHINES_PREFIX))
