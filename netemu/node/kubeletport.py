"""The kubelet's port (10250) on a cluster over several machines: a
container's log, asked for from another machine.

A pod's log files are on the machine that runs the pod, and kube-apiserver
does not read them either: it asks the pod's kubelet, at
/containerLogs/{namespace}/{pod}/{container} on the node's address and port
10250, with the query of pods/log (follow, previous, tailLines, limitBytes,
timestamps, sinceSeconds, sinceTime), and streams the answer back. So does
netemu: each node agent of a cluster with `machines:` serves that path for
its node's pods (the answer is the one the API server gives for a pod of its
own machine: the same code, ApiServer's pods/log), and the API server, or
`netemu logs` on any machine, asks the pod's node over the fabric, from a node
namespace of its own machine (the machine's own namespace has no route into
the cluster, by design).

Unlike a real kubelet's, the port is plain HTTP without authentication; it
answers connections from the cluster's node addresses only (the API server's
node, `netemu logs` from a node namespace; a pod reaching it is masqueraded to
its node's address, as it would reach a real kubelet's port) and serves
nothing but that path, for pods of its own node.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import urllib.parse

import trio

from netemu import names, netns
from netemu.store import registry

# The API server's modules (and netemu.machines, which brings the topology
# loader) are imported when first needed, not at the agent's start:
# netemu.apiserver.server alone is ~0.2 s of CPU, paid by every agent of a
# cluster (measured: 100 nodes on one simulated machine came up in 35 s with
# it imported at start, 23-25 s without).

log = logging.getLogger("netemu.kubelet.port")

PORT = 10250
CONNECT_TIMEOUT = 5.0
PATH = re.compile(r"/containerLogs/([^/]+)/([^/]+)/([^/]+)")


def internal_ip(node: dict | None) -> str | None:
    return next((a.get("address") for a in ((node or {}).get("status") or {}).get("addresses") or []
                 if a.get("type") == "InternalIP"), None)


def node_addresses(store) -> set[str]:
    return {ip for ip in map(internal_ip, registry.list_(store, "Node")) if ip}


def elsewhere(cluster: str, store, pod: dict) -> dict | None:
    """The Node object of POD's node when that node runs on another machine
    than this one (a cluster over several machines); None: here."""
    from netemu import machines

    here = machines.name(cluster)
    node_name = (pod.get("spec") or {}).get("nodeName")
    if here is None or not node_name:
        return None
    node = registry.get(store, "Node", None, node_name)
    there = ((node or {}).get("metadata", {}).get("labels") or {}).get(names.MACHINE_LABEL)
    return node if there not in (None, here) else None


# -- the server, in each node agent -----------------------------------------------------

async def serve(cluster: str, node: str, store, settings) -> None:
    """Serve NODE's pods' logs on its address, port PORT, until cancelled."""
    address = internal_ip(registry.get(store, "Node", None, node))
    if address is None:
        raise RuntimeError(f"node {node} has no InternalIP to serve the kubelet's port on")
    server = None

    async def handle(req):
        from netemu.apiserver import status
        from netemu.apiserver.http import Request

        m = PATH.fullmatch(req.path)
        if m is None:
            return status.no_route()
        if req.method != "GET":
            return status.method_not_allowed()
        namespace, pod, container = (urllib.parse.unquote(g) for g in m.groups())
        obj = registry.get(store, "Pod", namespace, pod)
        if obj is None or (obj.get("spec") or {}).get("nodeName") != node:
            return status.not_found("pods", pod)
        query = {k: v for k, v in req.query.items() if k != "container"}
        query["container"] = [container]
        return await logs().handle(Request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log", query,
                                           req.headers, b""))

    def logs():
        """The API server's pods/log, for this node's pods (made once, when first asked)."""
        nonlocal server
        if server is None:
            from netemu.apiserver.server import ApiServer
            server = ApiServer(store, settings, cluster=cluster,
                               pod_dir=lambda namespace, pod: names.pod_dir(cluster, namespace, pod))
        return server

    async def on_connection(stream: trio.SocketStream) -> None:
        from netemu.apiserver import status
        from netemu.apiserver.http import serve_connection

        try:
            peer = stream.socket.getpeername()[0]
            if peer not in node_addresses(store):
                log.warning("refused a connection from %s (not a node of the cluster)", peer)
                await stream.aclose()
                return
            await serve_connection(stream, handle, status.too_large, status.bad_request)
        except Exception:       # noqa: BLE001 - one connection's failure must not stop the port
            log.exception("connection failed")

    listeners = await trio.open_tcp_listeners(PORT, host=address)
    log.info("serving containers' logs on %s:%d", address, PORT)
    await trio.serve_listeners(on_connection, listeners)


# -- the client: the API server, `netemu logs` ---------------------------------------------

class KubeletError(RuntimeError):
    """The pod's kubelet could not be reached (one line, as the API server says it)."""


def local_node_ns(cluster: str, store) -> str:
    """A node namespace of this machine, to reach the fabric from."""
    from netemu import machines

    here = machines.name(cluster)
    for node in registry.list_(store, "Node"):
        if (node["metadata"].get("labels") or {}).get(names.MACHINE_LABEL) == here \
                and netns.exists(names.node_ns(cluster, node["metadata"]["name"])):
            return names.node_ns(cluster, node["metadata"]["name"])
    raise KubeletError(f"machine {here} runs no node of the cluster to reach other nodes from")


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, ns: str, follow: bool):
        super().__init__(host, PORT, timeout=CONNECT_TIMEOUT)
        self.ns, self.follow = ns, follow

    def connect(self) -> None:
        fd = os.open(netns.path(self.ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.sock = netns.connect_in(fd, (self.host, self.port), self.timeout)
        finally:
            os.close(fd)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.follow:
            self.sock.settimeout(None)      # a followed log may be quiet for long


def open_log(cluster: str, store, node: dict, namespace: str, pod: str, container: str,
             query: dict[str, list[str]]) -> http.client.HTTPResponse:
    """Ask NODE's kubelet for a container's log (QUERY: pods/log's, without
    container), asking it to close the connection after its answer. The
    response is open: read it, then close it."""
    ip = internal_ip(node)
    path = "/containerLogs/" + "/".join(urllib.parse.quote(p, safe="") for p in (namespace, pod, container))
    query = {k: v for k, v in query.items() if k != "container"}
    url = path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
    follow = (query.get("follow") or [""])[-1] in ("true", "1")
    conn = _Connection(ip, local_node_ns(cluster, store), follow)
    try:
        conn.request("GET", url, headers={"Connection": "close"})
        sock = conn.sock        # the connection lets go of it once the answer says "close"
        resp = conn.getresponse()
    except OSError as e:
        conn.close()
        raise KubeletError(f'Get "http://{ip}:{PORT}{url}": {e}') from None
    resp.sock = sock            # for hang_up: the reader of a followed log may be blocked in it
    return resp


def hang_up(resp: http.client.HTTPResponse) -> None:
    """End RESP from any thread, also while another thread is blocked
    reading it (closing it there would wait for that reader: the file's
    lock): shut the socket down, which wakes the reader, who then sees the
    end."""
    try:
        resp.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def read_log(cluster: str, store, node: dict, namespace: str, pod: str, container: str,
             previous: bool = False) -> str:
    """A container's whole log so far, from NODE's kubelet (the Python API's
    Cluster.logs). Raises KubeletError (not reached) or the kubelet's refusal
    as an ApiError (no previous instance, ...)."""
    from netemu.api import ApiError

    resp = open_log(cluster, store, node, namespace, pod, container,
                    {"previous": ["true" if previous else "false"]})
    try:
        body = resp.read()
    finally:
        resp.close()
    if resp.status != 200:
        try:
            refusal = json.loads(body)
            raise ApiError(refusal["message"], reason=refusal.get("reason") or "BadRequest")
        except (ValueError, KeyError, TypeError):
            raise KubeletError(f"{node['metadata']['name']}'s kubelet port answered {resp.status}: "
                               f"{body[:200].decode(errors='replace')}") from None
    return body.decode(errors="replace")
