"""The kubelet's port (10250) on a cluster over several machines: a
container's log, exec, attach and port-forward, asked for from another machine.

A pod's log files and its namespaces are on the machine that runs the pod,
and kube-apiserver does not reach into them either: it asks the pod's kubelet
on the node's address and port 10250, and relays the answer. So does netemu:
each node agent of a cluster with `machines:` serves, for its node's pods,

    GET  /containerLogs/{namespace}/{pod}/{container}    pods/log's query (follow, previous,
                                                         tailLines, limitBytes, timestamps, ...)
    GET|POST /exec/{namespace}/{pod}/{container}         ?command=..&stdin=..&stdout=..&stderr=..&tty=..
    GET|POST /attach/{namespace}/{pod}/{container}       ?stdin=..&stdout=..&stderr=..
    GET|POST /portForward/{namespace}/{pod}              (?ports=P for v4.channel.k8s.io)

the last three with the upgrades the API server takes for pods/exec, attach
and portforward (WebSocket v5/v4.channel.k8s.io, SPDY/3.1; apiserver/podstream.py).
Each answer is the one the API server gives for a pod of its own machine: the
same code (ApiServer's pods/log and podstream), run in the agent. The API
server, or `netemu logs` / `netemu exec` on any machine, asks the pod's node
over the fabric, from a node namespace of its own machine (the machine's own
namespace has no route into the cluster, by design); for an upgrade, the API
server relays the upgraded connection's bytes both ways without reading them
(relay(); kube-apiserver's UpgradeAwareHandler does the same), so kubectl's
protocol is spoken end to end between kubectl and the kubelet port.

Unlike a real kubelet's, the port is plain HTTP without authentication; it
answers connections from the cluster's node addresses only (the API server's
node, `netemu logs` and `netemu exec` from a node namespace; a pod reaching it
is masqueraded to its node's address, as it would reach a real kubelet's port)
and serves nothing but those paths, for pods of its own node.
"""

from __future__ import annotations

import http.client
import json
import logging
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
# the kubelet's paths -> the pod subresource of the API server that serves them
SUBRESOURCES = {"containerLogs": "log", "exec": "exec", "attach": "attach", "portForward": "portforward"}
PATH = re.compile(r"/(containerLogs|exec|attach)/([^/]+)/([^/]+)/([^/]+)|/(portForward)/([^/]+)/([^/]+)")


def route(path: str) -> tuple[str, str, str, str | None] | None:
    """(subresource, namespace, pod, container or None) of a kubelet port's
    PATH (percent-escapes undone); None: not a path the port serves."""
    m = PATH.fullmatch(path)
    if m is None:
        return None
    verb, *parts = (g for g in m.groups() if g is not None)
    namespace, pod, *container = (urllib.parse.unquote(p) for p in parts)
    return SUBRESOURCES[verb], namespace, pod, container[0] if container else None


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

def handler(cluster: str, node: str, store, settings):
    """The kubelet port's request handler for NODE's pods (an http.Handler)."""
    server = None

    async def handle(req):
        from netemu.apiserver import status
        from netemu.apiserver.http import Request

        where = route(req.path)
        if where is None:
            return status.no_route()
        subresource, namespace, pod, container = where
        if req.method != "GET" and (subresource == "log" or req.method != "POST"):
            return status.method_not_allowed()
        obj = registry.get(store, "Pod", namespace, pod)
        if obj is None or (obj.get("spec") or {}).get("nodeName") != node:
            return status.not_found("pods", pod)
        query = {k: v for k, v in req.query.items() if k != "container"}
        if container is not None:
            query["container"] = [container]
        return await api().handle(Request(req.method, f"/api/v1/namespaces/{namespace}/pods/{pod}/{subresource}",
                                          query, req.headers, req.body))

    def api():
        """The API server's pods/log, exec, attach and portforward, for this
        node's pods (made once, when first asked)."""
        nonlocal server
        if server is None:
            from netemu.apiserver.server import ApiServer
            server = ApiServer(store, settings, cluster=cluster,
                               pod_dir=lambda namespace, pod: names.pod_dir(cluster, namespace, pod))
        return server

    return handle


async def serve(cluster: str, node: str, store, settings) -> None:
    """Serve NODE's pods' logs, exec, attach and port-forward on its
    address, port PORT, until cancelled."""
    address = internal_ip(registry.get(store, "Node", None, node))
    if address is None:
        raise RuntimeError(f"node {node} has no InternalIP to serve the kubelet's port on")
    handle = handler(cluster, node, store, settings)

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
    log.info("serving containers' logs, exec, attach and port-forward on %s:%d", address, PORT)
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
    conn = netns.http_connection(ip, PORT, local_node_ns(cluster, store), CONNECT_TIMEOUT, stream=follow)
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


# -- upgrades: the API server's exec, attach and port-forward of a pod elsewhere ------------

# The request headers an upgrade needs at the kubelet: the upgrade itself and
# the protocols offered (the rest, e.g. the client's credentials, are the API
# server's business, as kube-apiserver does not pass them on either).
UPGRADE_HEADERS = ("upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
                   "x-stream-protocol-version")
RELAY_SIZE = 65536
ANSWER_TIMEOUT = 30.0           # seconds for a kubelet port's answer to an upgrade


def kubelet_path(subresource: str, namespace: str, pod: str, container: str | None) -> str:
    """The kubelet port's path for a pod subresource (exec, attach, portforward, log)."""
    verb = next(v for v, s in SUBRESOURCES.items() if s == subresource)
    parts = [namespace, pod] + ([container] if verb != "portForward" else [])
    return f"/{verb}/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


async def connect(cluster: str, store, node: dict) -> trio.SocketStream:
    """A TCP connection to NODE's kubelet port, made from a node namespace of
    this machine (KubeletError naming the address if it cannot be made)."""
    ip = internal_ip(node)
    if ip is None:
        raise KubeletError(f"node {node['metadata']['name']} has no InternalIP to reach its kubelet port at")
    ns = local_node_ns(cluster, store)

    def make() -> socket.socket:
        with netns.inside(ns):
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    sock = trio.socket.from_stdlib_socket(await trio.to_thread.run_sync(make))
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await sock.connect((ip, PORT))
    except (OSError, trio.TooSlowError) as e:
        sock.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "i/o timeout"
        raise KubeletError(f"error dialing backend: dial tcp {ip}:{PORT}: connect: {reason.lower()}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return trio.SocketStream(sock)


async def open_upgrade(cluster: str, store, node: dict, method: str, target: str, headers: dict[str, str]):
    """Ask NODE's kubelet port for TARGET (path and query) with the upgrade
    HEADERS (lower-case names) of the client's request: upgrade()'s answer.
    Raises KubeletError when the port cannot be reached or breaks HTTP."""
    return await upgrade(await connect(cluster, store, node), f"{internal_ip(node)}:{PORT}", method, target,
                         headers)


async def upgrade(stream: trio.abc.Stream, host: str, method: str, target: str, headers: dict[str, str]):
    """Send an upgrade request on STREAM (a connection to HOST, a kubelet
    port) and read the answer: (status, headers, body, stream, trailing). On
    101: the upgraded connection and the bytes the kubelet sent after its
    answer (body b""); otherwise its answer, the connection closed (stream
    None). KubeletError if it breaks HTTP or does not answer in time."""
    import h11

    ok = False
    try:
        conn = h11.Connection(h11.CLIENT)
        sent = [("Host", host)] + [(name, headers[name]) for name in UPGRADE_HEADERS if headers.get(name)]
        if method == "POST":
            sent.append(("Content-Length", "0"))
        try:
            await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=sent)) +
                                  conn.send(h11.EndOfMessage()))
            with trio.fail_after(ANSWER_TIMEOUT):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(RELAY_SIZE))
                    elif not (isinstance(event, h11.InformationalResponse) and event.status_code != 101):
                        break           # (a 100 Continue: the answer is still to come)
                answer = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
                if isinstance(event, h11.InformationalResponse):
                    ok = True
                    return 101, answer, b"", stream, bytes(conn.trailing_data[0])
                if not isinstance(event, h11.Response):
                    raise h11.RemoteProtocolError(f"no answer, but {type(event).__name__}")
                body = bytearray()
                while not isinstance(part := conn.next_event(), (h11.EndOfMessage, h11.ConnectionClosed)):
                    if part is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(RELAY_SIZE))
                    elif isinstance(part, h11.Data):
                        body += part.data
                return event.status_code, answer, bytes(body), None, b""
        except (h11.ProtocolError, trio.BrokenResourceError, trio.TooSlowError, OSError) as e:
            raise KubeletError(f"error proxying to the kubelet port {host}: {str(e) or type(e).__name__}") from None
    finally:
        if not ok:
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def relay(client: trio.abc.Stream, client_trailing: bytes, kubelet: trio.abc.Stream,
                kubelet_trailing: bytes) -> None:
    """Copy an upgraded connection's bytes both ways, unread, until either
    side ends it; then both are closed (kube-apiserver's UpgradeAwareHandler
    does the same: the protocol inside is the two ends' business)."""
    async def copy(source: trio.abc.Stream, sink: trio.abc.Stream, first: bytes, done: trio.CancelScope) -> None:
        try:
            if first:
                await sink.send_all(first)
            while data := await source.receive_some(RELAY_SIZE):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        done.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, client, kubelet, client_trailing, nursery.cancel_scope)
            nursery.start_soon(copy, kubelet, client, kubelet_trailing, nursery.cancel_scope)
    finally:
        with trio.CancelScope(shield=True):
            await kubelet.aclose()
            await client.aclose()
