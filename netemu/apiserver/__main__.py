"""The API server process of one cluster (started and supervised by the control plane)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

import trio

from netemu import apiserver, clusterconfig, names, netns
from netemu.apiserver import bootstrap, http, status
from netemu.apiserver.server import ApiServer, ensure_system_namespaces
from netemu.store import open_store, registry
from netemu.supervisor import stop_on_signal, watch_parent

log = logging.getLogger("netemu.apiserver")


def master_node(topology) -> str:
    """The node the API server listens on (Topology.master_node)."""
    return topology.master_node()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def open_sockets(cluster: str, node: str, node_address: str | None, port: int) -> list[socket.socket]:
    """The listening sockets: in the node's namespace (loopback and eth0, port
    8080, and loopback at PORT too), then the machine's loopback at PORT. A
    socket belongs to the namespace it was made in, so the node's are made from
    inside it; the thread then returns home.

    PORT inside the node as well: `ip netns exec <master> kubectl ...` keeps the
    user's kubeconfig, whose current context may well be this cluster's
    (127.0.0.1:PORT); it then reaches the same server as on the machine."""
    socks = []
    with netns.inside(names.node_ns(cluster, node)):
        socks.append(_listen("127.0.0.1", apiserver.INSECURE_PORT))
        if node_address:
            socks.append(_listen(node_address, apiserver.INSECURE_PORT))
        if port != apiserver.INSECURE_PORT:
            socks.append(_listen("127.0.0.1", port))
    socks.append(_listen("127.0.0.1", port))
    return socks


async def run(cluster: str) -> None:
    config = apiserver.read_config(cluster)
    if config is None:
        raise SystemExit(f"{apiserver.config_path(cluster)}: missing; the cluster was made without an API server")
    store = open_store(cluster)
    topology = clusterconfig.read(cluster, store)
    node = master_node(topology)
    node_obj = registry.get(store, "Node", None, node) or {}
    address = next((a["address"] for a in (node_obj.get("status") or {}).get("addresses") or []
                    if a.get("type") == "InternalIP"), None)
    ensure_system_namespaces(store)
    socks = open_sockets(cluster, node, address, int(config["port"]))
    server = ApiServer(store, topology.settings, f"{address or '127.0.0.1'}:{apiserver.INSECURE_PORT}",
                       pod_dir=lambda namespace, pod: names.pod_dir(cluster, namespace, pod), cluster=cluster)
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
    log.info("serving on node %s (127.0.0.1:%d, %s:%d) and the machine's 127.0.0.1:%d", node,
             apiserver.INSECURE_PORT, address, apiserver.INSECURE_PORT, config["port"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, nursery.cancel_scope)
        # A controllers part killed with -9 leaves us behind: make way for the
        # server its successor starts (it needs our ports).
        nursery.start_soon(watch_parent, nursery.cancel_scope)
        nursery.start_soon(http.serve, listeners, server.handle, status.too_large, status.bad_request)
        nursery.start_soon(bootstrap.run, store, topology.settings, address, apiserver.INSECURE_PORT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netemu-apiserver")
    parser.add_argument("cluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(run, args.cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
