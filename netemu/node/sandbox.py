"""Pod sandboxes: the "pause" role, and the CNI bridge plugin's work.

A sandbox is what every container of a pod joins: one network namespace (eth0,
one IP, one localhost) and one UTS namespace (hostname = pod name), held by a
tiny process named `pause`. Its eth0 is one end of a veth pair whose other end
(vethXXXXXXX) is a port of the node's docker0, with hairpin mode on so that a
pod can reach itself through a Service. The MAC follows Docker's 02:42:<ip>.

The kubelet keeps its sandbox record in the pod's folder (sandbox.json), for
itself alone: a restarted kubelet adopts the sandbox from it. What readers off
the node need (describe, exec, capture, the API server) it publishes on the
Pod, with status.podIP: the annotation netemu.io/sandbox (annotation(),
published()), one line of JSON as Multus publishes k8s.v1.cni.cncf.io/network-status.

A pod annotated `netemu.io/link: "rate 10mbit delay 5ms loss 1%"` gets that
impairment on its veth pair, both directions (netemu.link.Link.impair), when
its sandbox is built: read once, as the CNI bandwidth plugin reads
kubernetes.io/egress-bandwidth; a later change applies to a new pod only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os

from netemu import impairment, journal, names, netns
from netemu.link import End, Link
from netemu.topology.names import pod_hostname


@dataclasses.dataclass
class Sandbox:
    namespace: str              # network namespace name (under /run/netns)
    veth: str                   # node-side veth
    ip: str                     # pod IP
    gateway: str
    prefixlen: int
    mtu: int
    pause_pid: int = 0
    # Segments per TSO burst of the pod's eth0 (0: the kernel's default). The udp
    # backend's fast path sends at most 44 datagrams (65507 bytes of 1472) per
    # UDP GSO call; pods sending bigger bursts cost it a second call.
    gso_max_segs: int = 0
    # Whose sandbox this is, and the pause's start time (clock ticks): what a
    # restarted kubelet checks before it adopts the sandbox, and what its
    # clean-up of orphaned pod folders goes by.
    uid: str = ""
    node: str = ""
    pause_start: int = 0
    # The pod's netemu.io/link annotation when the sandbox was built ("": none):
    # what destroy_network must undo (delay-line processes, nft tables).
    link: str = ""

    def save(self, pod_dir: str) -> None:
        # Written whole or not at all: a kubelet killed mid-write must not
        # leave a record that a restarted one cannot read.
        tmp = os.path.join(pod_dir, "sandbox.json.tmp")
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f)
        os.replace(tmp, os.path.join(pod_dir, "sandbox.json"))

    @classmethod
    def load(cls, pod_dir: str) -> "Sandbox | None":
        try:
            with open(os.path.join(pod_dir, "sandbox.json")) as f:
                return cls(**json.load(f))
        except (FileNotFoundError, ValueError, TypeError):
            return None


ANNOTATION = "netemu.io/sandbox"


def annotation(sb: Sandbox) -> str:
    """SB as the kubelet publishes it on its Pod (ANNOTATION): what is needed
    to find and enter it from off the node."""
    return json.dumps({"netns": sb.namespace, "veth": sb.veth, "pausePID": sb.pause_pid,
                       "address": f"{sb.ip}/{sb.prefixlen}", "gateway": sb.gateway, "mtu": sb.mtu},
                      separators=(",", ":"))


def published(pod: dict) -> Sandbox | None:
    """The sandbox POD's kubelet published (ANNOTATION), as a Sandbox (node
    and uid from the Pod); None when there is none or it is malformed (an
    annotation anyone may write: whoever enters it checks it, see
    pause_pid_of)."""
    meta = pod.get("metadata") or {}
    text = (meta.get("annotations") or {}).get(ANNOTATION)
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
        iface = ipaddress.IPv4Interface(data["address"])
        sb = Sandbox(namespace=data["netns"], veth=data["veth"], ip=str(iface.ip), gateway=data["gateway"],
                     prefixlen=iface.network.prefixlen, mtu=data["mtu"], pause_pid=data["pausePID"],
                     uid=str(meta.get("uid") or ""), node=str((pod.get("spec") or {}).get("nodeName") or ""))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    ok = (all(isinstance(v, str) and v for v in (sb.namespace, sb.veth, sb.gateway))
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (sb.mtu, sb.pause_pid)))
    return sb if ok else None


def pause_pid_of(cluster: str, pod: dict) -> int | None:
    """The pause process of POD's running sandbox, checked against the kernel:
    the published PID must live in the pod's own network namespace (the name
    netemu gives it, not the annotation's word). None when it is not running.
    What exec enters, from the CLI or the API server."""
    sb = published(pod)
    meta = pod.get("metadata") or {}
    if sb is None:
        return None
    expected = netns.inode(names.pod_ns(cluster, meta.get("namespace") or "default", meta.get("name") or ""))
    try:
        actual = os.stat(f"/proc/{sb.pause_pid}/ns/net").st_ino
    except OSError:
        return None
    return sb.pause_pid if expected is not None and actual == expected else None


def docker_mac(ip: ipaddress.IPv4Address) -> str:
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)


def create_network(cluster: str, node: str, sb: Sandbox) -> None:
    """Namespace, veth pair on docker0, address and default route, the two
    static neighbour entries, and the link's impairment if the pod asks for one
    (blocking).

    Neighbour entries: every MAC on a pod's wire is known in advance (the pod's
    is 02:42:<its ip>, docker0's 02:42:<the gateway's ip>, see
    host.configure_bridge), so the pod gets a PERMANENT entry for its gateway
    and the node one on docker0 for the pod, instead of learning them by ARP.
    The kernel does not count PERMANENT entries against gc_thresh3, the
    neighbour table's one limit for all namespaces together (1024 by default):
    a thousand pods that talk would otherwise fill it twice over ("neighbour
    table overflow", dropped packets)."""
    journal.create_netns(cluster, sb.namespace)
    gateway_mac = docker_mac(ipaddress.IPv4Address(sb.gateway))
    pod_link(cluster, node, sb).create(
        far_before=["link set lo up"],
        far_after=[f"route add default via {sb.gateway} dev {names.POD_IFACE}",
                   f"neigh replace {sb.gateway} lladdr {gateway_mac} dev {names.POD_IFACE} nud permanent"],
        near_after=[f"neigh replace {sb.ip} lladdr {docker_mac(ipaddress.IPv4Address(sb.ip))} "
                    f"dev {names.NODE_BRIDGE} nud permanent"])


def remove_neighbour(cluster: str, node: str, ip: str) -> None:
    """Remove the node's neighbour entry for pod IP on docker0 (create_network
    made it, in the `ip` batch of the pod's veth), over netlink from this
    process."""
    ipr = netns.iproute(names.node_ns(cluster, node))
    try:
        idx = ipr.link_lookup(ifname=names.NODE_BRIDGE)
        if idx:
            with contextlib.suppress(Exception):      # already gone (or never made)
                ipr.neigh("del", dst=ip, ifindex=idx[0])
    finally:
        ipr.close()


LINK_ANNOTATION = impairment.POD_ANNOTATION


def parse_link(text: str) -> impairment.Impairment | None:
    """A netemu.io/link annotation's impairment (None: none). Raises
    ImpairmentError naming the annotation."""
    if not text.strip():
        return None
    return impairment.parse_words(text, f"metadata.annotations[{LINK_ANNOTATION}]")


def pod_link(cluster: str, node: str, sb: Sandbox) -> Link:
    """The pod's cable: its vethXXXXXXX on docker0 (hairpin on) and its eth0."""
    return Link(near=End(names.node_ns(cluster, node), sb.veth), far=End(sb.namespace, names.POD_IFACE),
                mtu=sb.mtu, bridge=names.NODE_BRIDGE, hairpin=True,
                far_mac=docker_mac(ipaddress.IPv4Address(sb.ip)), far_address=f"{sb.ip}/{sb.prefixlen}",
                far_gso_max_segs=sb.gso_max_segs, impairment=parse_link(sb.link), cluster=cluster)


PAUSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netemu-pause")   # pause.c, built


def pause_argv(sb: Sandbox, hostname: str) -> list[str]:
    """The pause process: joins the pod's network namespace, makes a UTS namespace
    with the pod's hostname, then sleeps under the name "pause" (PAUSE_NAMES: the
    kubelet waits for it). A pod name longer than a hostname may be is cut as the
    kubelet cuts it (pod_hostname). The compiled pause (pause.c) where it was
    built; a shell chain doing the same otherwise."""
    if os.access(PAUSE, os.X_OK):
        return [PAUSE, netns.path(sb.namespace), pod_hostname(hostname)]
    return netns.exec_argv(sb.namespace, [
        "unshare", "--uts", "bash", "-c", 'hostname "$0" && exec -a pause sleep infinity',
        pod_hostname(hostname)])


# The pause process's name (/proc/PID/comm) once its namespaces are in place:
# the compiled one's, and the shell chain's sleep.
PAUSE_NAMES = ("pause", "sleep")


def destroy_network(cluster: str, node: str, sb: Sandbox) -> None:
    if sb.link.strip():
        # The link's delay lines are processes (one in the pod's namespace, one
        # in the node's) and its nft table on the node's end outlives the
        # device: an empty impairment stops and removes them all.
        with contextlib.suppress(impairment.ImpairmentError, netns.NetnsError, OSError):
            pod_link(cluster, node, sb).impair(impairment.Impairment())
    # Deleting the namespace takes eth0 with it, and the veth's node end with it.
    # Only one this cluster made: a name that was taken when create_network ran
    # is someone else's.
    journal.delete_netns(cluster, sb.namespace)
    # docker0's entry for the pod stays with docker0: remove it (one left
    # behind would still be right, the MAC follows the IP, but it would pile up).
    with contextlib.suppress(OSError, netns.NetnsError):
        remove_neighbour(cluster, node, sb.ip)
