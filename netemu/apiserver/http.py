"""HTTP/1.1 over trio with h11: requests in, responses (whole or streamed) out.

h11 is a sans-I/O protocol engine: it parses and frames, trio moves the bytes,
and nothing here is tied to an event loop h11 does not know about. One task per
connection; requests on a connection are served one after the other
(keep-alive), as kubectl and the Python client send them.

A handler returns a Response. A Response whose body is an async function is
streamed with chunked encoding (watch, logs -f): it is called with a `write`
coroutine for each chunk. (A function, not an async generator: a producer may
then wait inside cancel scopes, which a generator must not yield across.)
While it streams, the connection is read too, so a client that hangs up ends
the stream at once instead of at the next event.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from http import HTTPStatus
from collections.abc import Awaitable, Callable

import h11
import trio

log = logging.getLogger("netemu.apiserver.http")

MAX_BODY = 3 * 1024 * 1024          # the API server's limit on a request body (3 MiB)
MAX_HEADERS = 64 * 1024
READ_SIZE = 65536
IDLE_TIMEOUT = 300.0                # a keep-alive connection with no request this long is closed
SLOW_CLIENT_TIMEOUT = 60.0          # a stream whose client reads nothing this long is dropped


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]         # lower-case names; repeated headers joined with ", "
    body: bytes

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default


@dataclasses.dataclass
class Response:
    status: int
    body: bytes | Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]] = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # Set on a 101 Switching Protocols answer: run with the connection's stream
    # and the bytes the client sent after its request, once the 101 is out.
    upgrade: Callable[[trio.abc.Stream, bytes], Awaitable[None]] | None = None


INTERNAL_ERROR = (b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
                  b'"message":"Internal error occurred: see the API server\'s log",'
                  b'"reason":"InternalError","code":500}')

Handler = Callable[[Request], Awaitable[Response]]


class TooLarge(Exception):
    pass


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(READ_SIZE)
        conn.receive_data(data)


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> Request | None:
    with trio.move_on_after(IDLE_TIMEOUT):
        event = await _next_event(conn, stream)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        target = event.target.decode("latin-1")
        path, _, qs = target.partition("?")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            n, v = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[n] = f"{headers[n]}, {v}" if n in headers else v
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise TooLarge()
        body = bytearray()
        while True:
            part = await _next_event(conn, stream)
            if isinstance(part, h11.EndOfMessage):
                break
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY:
                    raise TooLarge()
        return Request(event.method.decode("latin-1"), urllib.parse.unquote(path),
                       urllib.parse.parse_qs(qs, keep_blank_values=True), headers, bytes(body))
    return None


async def _send(conn: h11.Connection, stream: trio.abc.Stream, event) -> None:
    data = conn.send(event)
    if data:
        # A client that stops reading is dropped rather than held forever
        # (kube-apiserver drops a watcher that falls behind likewise).
        with trio.move_on_after(SLOW_CLIENT_TIMEOUT) as slow:
            await stream.send_all(data)
        if slow.cancelled_caught:
            raise trio.BrokenResourceError(f"the client read nothing for {SLOW_CLIENT_TIMEOUT} s")


def _phrase(code: int) -> bytes:
    try:
        return HTTPStatus(code).phrase.encode()
    except ValueError:
        return b""


async def _respond(conn: h11.Connection, stream: trio.abc.Stream, resp: Response) -> None:
    if resp.upgrade is not None:
        if conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
            raise RuntimeError("an upgrade answered to a request that did not ask for one")
        await _send(conn, stream, h11.InformationalResponse(status_code=101, headers=resp.headers,
                                                            reason=b"Switching Protocols"))
        data, _closed = conn.trailing_data
        await resp.upgrade(stream, bytes(data))
        return
    headers = [("Content-Type", resp.content_type), ("Cache-Control", "no-cache, private"), *resp.headers]
    if isinstance(resp.body, bytes):
        headers.append(("Content-Length", str(len(resp.body))))
        await _send(conn, stream, h11.Response(status_code=resp.status, headers=headers,
                                               reason=_phrase(resp.status)))
        if resp.body:
            await _send(conn, stream, h11.Data(data=resp.body))
        await _send(conn, stream, h11.EndOfMessage())
        return
    # Streamed: no Content-Length, so h11 frames it with chunked encoding.
    headers.append(("Transfer-Encoding", "chunked"))
    await _send(conn, stream, h11.Response(status_code=resp.status, headers=headers,
                                           reason=_phrase(resp.status)))
    hung_up = False
    async with trio.open_nursery() as nursery:
        async def watch_for_hangup() -> None:
            nonlocal hung_up
            # The client sends nothing while it reads a stream; any read
            # returning means it closed (or broke the protocol): stop.
            try:
                await stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            hung_up = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_for_hangup)
        # Failures are noted, not raised, inside the nursery: trio would wrap
        # them in an ExceptionGroup; the plain error is raised after it.
        async def write(chunk: bytes) -> None:
            if chunk:
                await _send(conn, stream, h11.Data(data=chunk))

        try:
            await resp.body(write)
            if not hung_up:
                await _send(conn, stream, h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            hung_up = True
        nursery.cancel_scope.cancel()
    if hung_up:
        raise trio.BrokenResourceError("client closed the stream")


async def serve_connection(stream: trio.SocketStream, handler: Handler,
                           too_large: Callable[[], Response], bad_request: Callable[[str], Response]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
    try:
        while True:
            try:
                request = await _read_request(conn, stream)
            except TooLarge:
                # Answer, then close: the rest of the body is not read.
                await _respond(conn, stream, too_large())
                return
            except h11.RemoteProtocolError as err:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _respond(conn, stream, bad_request(f"malformed HTTP request: {err}"))
                return
            if request is None:
                return
            try:
                response = await handler(request)
            except Exception:                       # a bug must cost one request, not the server
                log.exception("%s %s failed", request.method, request.path)
                response = Response(500, INTERNAL_ERROR)
            if response.upgrade is not None and conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
                response = Response(400, b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
                                         b'"message":"Upgrade request required","reason":"BadRequest","code":400}')
            await _respond(conn, stream, response)
            if response.upgrade is not None:
                return                          # the connection was the other protocol's
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def serve(listeners: list[trio.SocketListener], handler: Handler,
                too_large: Callable[[], Response], bad_request: Callable[[str], Response],
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def on_connection(stream: trio.SocketStream) -> None:
        try:
            await serve_connection(stream, handler, too_large, bad_request)
        except Exception:       # noqa: BLE001 - one connection's failure must not stop the server
            log.exception("connection failed")

    await trio.serve_listeners(on_connection, listeners, task_status=task_status)
