"""`kubectl port-forward`: connections into a pod's network namespace over SPDY.

kubectl listens on the machine itself (its socket, not netemu's); for each
connection it accepts, it opens two SPDY streams on one connection to the API
server, both with headers `port` and `requestid`: an error stream and a data
stream (`streamtype`). The server connects to localhost:PORT inside the pod's
network namespace, as the kubelet does, and copies bytes both ways: the data
stream's FIN shuts down the write half of the pod's socket, the pod's EOF is
the data stream's FIN, and then the error stream is closed, empty. A connection
that cannot be made gets a message on the error stream, which kubectl prints
(`an error occurred forwarding 8080 -> 80: ...`); a pair whose second stream
does not come within PAIR_WAIT gets the kubelet's "timed out waiting for streams".

kubectl 1.31+ first asks for the same SPDY bytes tunnelled in WebSocket binary
messages (subprotocol `SPDY/3.1+portforward.k8s.io`); WebSocketBytes adapts the
WebSocket to a byte stream so both are served by one PortForwarder.

The socket is made inside the pod's namespace by a worker thread that enters it
and comes back (netns.inside); a socket belongs for good to the namespace it
was made in, so it is used from the event loop afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from netemu import netns
from netemu.apiserver import spdy

log = logging.getLogger("netemu.apiserver.portforward")

PROTOCOL = "portforward.k8s.io"
WEBSOCKET_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
CHANNEL_PROTOCOL = "v4.channel.k8s.io"
PAIR_WAIT = 30.0                # seconds for the second stream of a pair to open


class WebSocketBytes(trio.abc.Stream):
    """A server-side WebSocket whose binary messages are a byte stream."""

    def __init__(self, stream: trio.abc.Stream, trailing: bytes):
        self.stream = stream
        self.ws = Connection(ConnectionType.SERVER)
        if trailing:
            self.ws.receive_data(trailing)
        self.lock = trio.Lock()
        self.closed = False

    async def send_all(self, data: bytes) -> None:
        if data:
            async with self.lock:
                await self.stream.send_all(self.ws.send(BytesMessage(data=data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        while not self.closed:
            out = bytearray()
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    out += event.data
                elif isinstance(event, TextMessage):
                    out += event.data.encode()
                elif isinstance(event, Ping):
                    async with self.lock:
                        await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        async with self.lock:
                            await self.stream.send_all(self.ws.send(event.response()))
                    self.closed = True
                    break
            if out:
                return bytes(out)
            if self.closed:
                break
            data = await self.stream.receive_some(65536)
            if not data:
                self.closed = True
                break
            self.ws.receive_data(data)
        return b""

    async def aclose(self) -> None:
        await self.stream.aclose()


def _socket_in(namespace: str) -> socket.socket:
    """A TCP socket made inside NAMESPACE (blocking: run in a worker thread)."""
    with netns.inside(namespace):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


async def connect_in(namespace: str, port: int) -> trio.SocketStream:
    """A connection to localhost:PORT inside NAMESPACE (OSError if refused)."""
    sock = trio.socket.from_stdlib_socket(await trio.to_thread.run_sync(_socket_in, namespace))
    try:
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _refusal(pod: str, namespace: str, port: int, err: OSError) -> str:
    """The kubelet's words (and Go's for the dial), which kubectl prints."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    return (f"error forwarding port {port} to pod {pod}: failed to connect to localhost:{port} inside "
            f"namespace \"{namespace}\": dial tcp4 127.0.0.1:{port}: connect: {reason.lower()}")


@dataclasses.dataclass
class Pair:
    port: int
    error_id: int = 0
    data_id: int = 0
    started: bool = False
    inbox: trio.MemorySendChannel | None = None     # client bytes for the pod; None at the data stream's FIN


class PortForwarder:
    """One port-forward connection: many request pairs, until the client hangs up."""

    def __init__(self, namespace: str, pod: str, connect=None):
        self.namespace, self.pod = namespace, pod
        self.conn = spdy.Connection()
        self.pairs: dict[str, Pair] = {}
        self.by_stream: dict[int, Pair] = {}
        self.last_id = 0
        # CONNECT(port) -> a stream to the pod's port (tests give their own).
        self.connect = connect or (lambda port: connect_in(namespace, port))

    async def _flush(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)

    async def run(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        self.stream, self.lock = stream, trio.Lock()
        self.conn.receive_data(trailing)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                while True:
                    for event in self.conn.events():
                        if not await self._event(event):
                            return
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    self.conn.receive_data(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, spdy.ProtocolError) as err:
                log.info("port-forward to %s: %s", self.pod, err)
            finally:
                nursery.cancel_scope.cancel()       # the client is gone: so are its connections

    async def _event(self, event) -> bool:
        """Act on one frame; False: the client is done with the connection."""
        if isinstance(event, spdy.SynStream):
            await self._open(event)
        elif isinstance(event, spdy.Data):
            pair = self.by_stream.get(event.stream_id)
            if pair is None or event.stream_id != pair.data_id or pair.inbox is None:
                return True                     # the error stream's (empty) data, or a closed pair
            if event.data:
                try:
                    await pair.inbox.send(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return True                 # the pod's side is gone; its FIN is on the way
            if event.fin:
                pair.inbox.close()
                pair.inbox = None
        elif isinstance(event, spdy.RstStream):
            pair = self.by_stream.get(event.stream_id)
            if pair is not None and pair.inbox is not None:
                pair.inbox.close()
                pair.inbox = None
        elif isinstance(event, spdy.Ping):
            await self._flush(self.conn.ping(event.ping_id))
        elif isinstance(event, spdy.GoAway):
            return False
        return True

    async def _open(self, event: spdy.SynStream) -> None:
        h = event.headers
        self.last_id = max(self.last_id, event.stream_id)
        kind, request = h.get("streamtype"), h.get("requestid") or str(event.stream_id)
        try:
            port = int(h.get("port", ""))
            if not 0 < port < 65536 or kind not in ("error", "data"):
                raise ValueError
        except ValueError:
            await self._flush(self.conn.rst_stream(event.stream_id, spdy.REFUSED_STREAM))
            return
        pair = self.pairs.get(request)
        if pair is None:
            pair = self.pairs[request] = Pair(port)
            self.nursery.start_soon(self._expire, request, pair)
        if kind == "error":
            pair.error_id = event.stream_id
        else:
            pair.data_id = event.stream_id
        self.by_stream[event.stream_id] = pair
        await self._flush(self.conn.syn_reply(event.stream_id, {}))
        if pair.error_id and pair.data_id and not pair.started:
            pair.started = True
            send, receive = trio.open_memory_channel(16)
            pair.inbox = send
            self.nursery.start_soon(self._forward, request, pair, receive)

    async def _forward(self, request: str, pair: Pair, inbox: trio.MemoryReceiveChannel) -> None:
        try:
            target = await self.connect(pair.port)
        except OSError as err:
            message = _refusal(self.pod, self.namespace, pair.port, err)
            inbox.close()
            self._drop(request, pair)
            try:
                await self._flush(self.conn.data(pair.error_id, message.encode(), fin=True) +
                                  self.conn.data(pair.data_id, b"", fin=True))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return
        try:
            async with trio.open_nursery() as n:
                async def to_pod() -> None:
                    async for chunk in inbox:
                        await target.send_all(chunk)
                    try:
                        await target.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass

                async def from_pod() -> None:
                    while True:
                        try:
                            chunk = await target.receive_some(65536)
                        except (trio.BrokenResourceError, OSError):
                            chunk = b""
                        if not chunk:
                            break
                        await self._flush(self.conn.data(pair.data_id, chunk))
                    await self._flush(self.conn.data(pair.data_id, b"", fin=True) +
                                      self.conn.data(pair.error_id, b"", fin=True))
                    n.cancel_scope.cancel()

                n.start_soon(to_pod)
                n.start_soon(from_pod)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            inbox.close()
            with trio.CancelScope(shield=True):
                await target.aclose()
            self._drop(request, pair)

    async def _expire(self, request: str, pair: Pair) -> None:
        """A pair whose second stream has not come in PAIR_WAIT is given up,
        with the kubelet's words on its error stream."""
        await trio.sleep(PAIR_WAIT)
        if pair.started or self.pairs.get(request) is not pair:
            return
        self._drop(request, pair)
        out = b""
        if pair.error_id:
            out += self.conn.data(pair.error_id, f"request {request}: timed out waiting for streams".encode(),
                                  fin=True)
        if pair.data_id:
            out += self.conn.rst_stream(pair.data_id, spdy.CANCEL)
        try:
            await self._flush(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _drop(self, request: str, pair: Pair) -> None:
        self.pairs.pop(request, None)
        for sid in (pair.error_id, pair.data_id):
            self.by_stream.pop(sid, None)
        if pair.inbox is not None:
            pair.inbox.close()
            pair.inbox = None


class ChannelForwarder:
    """Port-forward over WebSocket `v4.channel.k8s.io`, as the kubelet serves it
    (the Python client's protocol): the ports are in the request (`ports=80`,
    repeated or comma-separated); port number I has data channel 2I and error
    channel 2I+1, each message starting with its channel byte, and the first
    message the server sends on each channel is the port, two bytes little-endian.
    One connection per port; the session ends when every pod side has closed."""

    def __init__(self, namespace: str, pod: str, ports: list[int], connect=None):
        self.namespace, self.pod, self.ports = namespace, pod, ports
        self.connect = connect or (lambda port: connect_in(namespace, port))
        self.ws = Connection(ConnectionType.SERVER)
        self.targets: dict[int, trio.abc.Stream | None] = {}

    async def _send(self, channel: int, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(self.ws.send(BytesMessage(data=bytes([channel]) + data)))

    async def run(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        self.stream, self.lock = stream, trio.Lock()
        if trailing:
            self.ws.receive_data(trailing)
        try:
            async with trio.open_nursery() as nursery:
                for i, port in enumerate(self.ports):
                    header = port.to_bytes(2, "little")
                    await self._send(2 * i, header)
                    await self._send(2 * i + 1, header)
                    try:
                        self.targets[i] = await self.connect(port)
                    except OSError as err:
                        self.targets[i] = None
                        await self._send(2 * i + 1, _refusal(self.pod, self.namespace, port, err).encode())
                nursery.start_soon(self._from_client, nursery.cancel_scope)
                async with trio.open_nursery() as pumps:
                    for i, target in self.targets.items():
                        if target is not None:
                            pumps.start_soon(self._from_pod, i, target)
                async with self.lock:
                    await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                for target in self.targets.values():
                    if target is not None:
                        await target.aclose()

    async def _from_pod(self, i: int, target: trio.abc.Stream) -> None:
        while True:
            try:
                chunk = await target.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                chunk = b""
            if not chunk:
                return
            await self._send(2 * i, chunk)

    async def _from_client(self, scope: trio.CancelScope) -> None:
        pending = bytearray()
        try:
            while True:
                for event in self.ws.events():
                    if isinstance(event, Ping):
                        async with self.lock:
                            await self.stream.send_all(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            async with self.lock:
                                await self.stream.send_all(self.ws.send(event.response()))
                        scope.cancel()
                        return
                    elif isinstance(event, (BytesMessage, TextMessage)):
                        pending += event.data if isinstance(event, BytesMessage) else event.data.encode()
                        if event.message_finished:
                            await self._to_pod(bytes(pending))
                            pending.clear()
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                self.ws.receive_data(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _to_pod(self, message: bytes) -> None:
        if len(message) < 2 or message[0] % 2:
            return                              # empty, or on an error channel
        target = self.targets.get(message[0] // 2)
        if target is not None:
            try:
                await target.send_all(message[1:])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


def parse_ports(values: list[str]) -> list[int]:
    """`ports=80&ports=443` or `ports=80,443` -> [80, 443]; ValueError naming the bad one."""
    ports = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part.isdigit() or not 0 < int(part) < 65536:
                raise ValueError(f"invalid port {part!r}: must be a number from 1 to 65535")
            ports.append(int(part))
    return ports
