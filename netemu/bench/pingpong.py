"""Request/response latency over TCP: a tiny echo server and a client that times
one-byte round trips (neither sockperf nor qperf is installed here).

    python -m netemu.bench.pingpong serve PORT
    python -m netemu.bench.pingpong client HOST PORT SECONDS

The client prints one JSON line: {"count": N, "rtt_us": [...]} (every round trip,
TCP_NODELAY on both ends, so each byte is one packet each way).
"""

from __future__ import annotations

import json
import socket
import sys
import time


def serve(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(1)
                if not data:
                    break
                conn.sendall(data)


def client(host: str, port: int, seconds: float) -> dict:
    conn = socket.create_connection((host, port), timeout=5)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    clock = time.perf_counter_ns
    deadline = time.monotonic() + seconds
    with conn:
        while time.monotonic() < deadline:
            start = clock()
            conn.sendall(b"x")
            if not conn.recv(1):
                break
            rtts.append((clock() - start) / 1000)
    return {"count": len(rtts), "rtt_us": rtts}


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(int(argv[1]))
    elif argv[:1] == ["client"]:
        print(json.dumps(client(argv[1], int(argv[2]), float(argv[3]))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
