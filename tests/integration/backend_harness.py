"""Run one overlay backend in a node's namespace, driven by JSON lines on stdin.

A stand-in for the overlay daemon in the backend tests: no state store, the
test hands leases over directly. Like the daemon, it enters the node namespace
before any thread exists, then:

    prints  {"backend_data": {...}}               (what would go in our lease)
    reads   {"op": "setup", "lease": {...}}        -> setup() and start run()
            {"op": "add_peer", "lease": {...}}
            {"op": "remove_peer", "lease": {...}}
            {"op": "counters"}
            {"op": "quit"}                         -> cancel run(), teardown()
    and answers each with one line: {"ok": ...} or {"error": "..."}.

A lease is {"key": "10.244.1.0-24", "value": <Lease.to_json()>}.

Usage: python backend_harness.py NODE_NS BACKEND LOCALCONFIG_JSON
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import traceback

from netemu import netns


def main() -> None:
    node_ns, backend_name, local_json = sys.argv[1:4]
    netns.enter(node_ns)              # before trio (and any thread) starts

    import trio

    from netemu.overlay.backend import Lease, LocalConfig, load

    raw = json.loads(local_json)
    local = LocalConfig(node=raw["node"], network=ipaddress.IPv4Network(raw["network"]),
                        public_ip=ipaddress.IPv4Address(raw["public_ip"]),
                        underlay_dev=raw.get("underlay_dev", "eth0"),
                        underlay_mtu=int(raw.get("underlay_mtu", 1500)),
                        backend_conf=raw.get("backend_conf", {}), state_dir=raw.get("state_dir", "/tmp"))
    backend = load(backend_name, local)

    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def lease_of(cmd) -> Lease:
        return Lease.from_json(cmd["lease"]["key"], cmd["lease"]["value"])

    async def serve() -> None:
        reply({"backend_data": backend.backend_data()})
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffer = b""
        async with trio.open_nursery() as nursery:
            while True:
                while b"\n" not in buffer:
                    chunk = await stdin.receive_some(65536)
                    if not chunk:                    # the test went away
                        nursery.cancel_scope.cancel()
                        return
                    buffer += chunk
                line, _, buffer = buffer.partition(b"\n")
                cmd = json.loads(line)
                op = cmd["op"]
                try:
                    if op == "setup":
                        backend.setup(lease_of(cmd))
                        nursery.start_soon(backend.run)
                        reply({"ok": True})
                    elif op == "add_peer":              # as the daemon: the change, then flush_peers
                        backend.add_peer(lease_of(cmd))
                        backend.flush_peers()
                        reply({"ok": True})
                    elif op == "remove_peer":
                        backend.remove_peer(lease_of(cmd))
                        backend.flush_peers()
                        reply({"ok": True})
                    elif op == "counters":
                        reply({"ok": dict(backend.counters)})
                    elif op == "quit":
                        nursery.cancel_scope.cancel()
                        reply({"ok": True})
                        return
                    else:
                        reply({"error": f"unknown op {op!r}"})
                except Exception:
                    reply({"error": traceback.format_exc()})

    try:
        trio.run(serve)
    finally:
        backend.teardown()


if __name__ == "__main__":
    main()
