"""`netemu exec` into a pod of another machine: a client of its node's kubelet
port (/exec, node/kubeletport.py), as kubectl exec is a client of the API
server's pods/exec.

    python -m netemu.node.kubeletexec NODE_NS ADDRESS NAMESPACE POD CONTAINER -- COMMAND...

It connects from NODE_NS, a node namespace of this machine (the machine's own
namespace has no route into the cluster), to ADDRESS:10250, the pod's node,
and asks for an upgrade to WebSocket `v5.channel.k8s.io`, kubectl 1.30+'s
protocol (apiserver/podexec.py serves it): binary messages whose first byte is
the channel, 0 stdin, 1 stdout, 2 stderr, 3 the Status when the command ends,
4 resize; [255, 0] closes stdin.

`netemu exec` runs this in its own place, as it runs nsenter for a pod of its
own machine, so the exit status is the command's: the Status's exit code
(NonZeroExitCode, details.causes ExitCode), 0 on Success. This process's stdin
is the command's (its end closes the command's), stdout and stderr come back
on theirs. When stdin and stdout are both terminals, the command gets a
terminal too (tty=true, as a command run locally on one has one): this one is
put in raw mode for the session, its size is sent at the start and at each
SIGWINCH, and stderr comes on the terminal with stdout. A refusal or a failure
before the command runs (no such container, not running, the port not
reached) is one line, "netemu: error: ...", and status 1, as netemu's errors.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.parse

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, RejectData,
                            Request, TextMessage)

from netemu import netns
from netemu.node import kubeletport

PROTOCOL = "v5.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
HANDSHAKE_TIMEOUT = 30.0
READ_SIZE = 65536


class ExecError(Exception):
    """The command could not be run (one line, said as netemu says errors)."""


def exec_target(namespace: str, pod: str, container: str, command: list[str], stdin: bool, tty: bool) -> str:
    """The kubelet port's /exec path and query, as the API server passes
    kubectl's on (stderr comes with stdout on a terminal)."""
    flag = lambda on: "true" if on else "false"         # noqa: E731
    query = [("command", c) for c in command] + [
        ("stdin", flag(stdin)), ("stdout", "true"), ("stderr", flag(not tty)), ("tty", flag(tty))]
    return kubeletport.kubelet_path("exec", namespace, pod, container) + "?" + urllib.parse.urlencode(query)


def exit_code(status: dict | None) -> tuple[int, str | None]:
    """(exit status, a message to print or None) for the Status the kubelet
    sent when the command ended (None: it sent none)."""
    if status is None:
        return 1, "the kubelet port ended the session without the command's exit status"
    if status.get("status") == "Success":
        return 0, None
    if status.get("reason") == "NonZeroExitCode":
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message")), None
                except (TypeError, ValueError):
                    break
    return 1, status.get("message") or f"the command failed: {json.dumps(status)}"


def _refusal(code: int, body: bytes) -> str:
    """A refused upgrade's words: the Status's message, else the body."""
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace").strip()
        return f"the kubelet port answered {code}" + (f": {text[:200]}" if text else "")


class Session:
    """One exec over one connection: the handshake, then the channels until
    the command's Status and the close."""

    def __init__(self, stream: trio.abc.Stream, host: str, target: str):
        self.stream, self.host, self.target = stream, host, target
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.lock = trio.Lock()
        self.status: dict | None = None
        self.reader_gone = False            # WRITE raised BrokenPipeError

    async def _send(self, event) -> None:
        async with self.lock:
            await self.stream.send_all(self.ws.send(event))

    async def send(self, channel: int, data: bytes) -> None:
        """Send DATA on CHANNEL while the session is open; once either side
        has begun the close, input has nowhere to go and is dropped (stdin's
        end may come just after the command's)."""
        async with self.lock:
            if self.ws.state is ConnectionState.OPEN:
                await self.stream.send_all(self.ws.send(BytesMessage(data=bytes([channel]) + data)))

    async def _receive(self) -> bool:
        data = await self.stream.receive_some(READ_SIZE)
        self.ws.receive_data(data or None)
        return bool(data)

    async def handshake(self) -> None:
        """Upgrade the connection, or raise ExecError with the kubelet's refusal."""
        await self._send(Request(host=self.host, target=self.target, subprotocols=[PROTOCOL]))
        refused, body = None, bytearray()
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as late:
            while True:
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection):
                        if event.subprotocol != PROTOCOL:
                            raise ExecError(f"the kubelet port chose the protocol {event.subprotocol!r}, "
                                            f"not {PROTOCOL}")
                        return
                    if isinstance(event, RejectConnection):
                        refused = event.status_code
                        if not event.has_body:
                            raise ExecError(_refusal(refused, b""))
                    elif isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            raise ExecError(_refusal(refused, bytes(body)))
                if not await self._receive():
                    raise ExecError("the kubelet port closed the connection before answering"
                                    if refused is None else _refusal(refused, bytes(body)))
        if late.cancelled_caught:
            raise ExecError(f"the kubelet port did not answer in {HANDSHAKE_TIMEOUT:.0f} s")

    async def serve(self, read_stdin, write, tty_sizes=None) -> int:
        """Send stdin (READ_STDIN() -> bytes, b"" at its end; None: no stdin)
        and the terminal's sizes (TTY_SIZES: an async iterator of (width,
        height)), hand the output to WRITE(channel, bytes), until the
        kubelet's close: the command's exit status (ExecError: none came;
        141 when WRITE found its reader gone)."""
        async with trio.open_nursery() as nursery:
            if read_stdin is not None:
                nursery.start_soon(self._stdin, read_stdin)
            if tty_sizes is not None:
                nursery.start_soon(self._sizes, tty_sizes)
            try:
                await self._output(write)
            finally:
                nursery.cancel_scope.cancel()
        if self.reader_gone:
            return 141                      # as netemu's CLI says it when its reader goes away
        code, message = exit_code(self.status)
        if message is not None:
            raise ExecError(message)
        return code

    async def _stdin(self, read_stdin) -> None:
        try:
            while data := await read_stdin():
                await self.send(STDIN, data)
            await self.send(CLOSE, bytes([STDIN]))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass                        # the session is over: _output says how

    async def _sizes(self, sizes) -> None:
        try:
            async for width, height in sizes:
                await self.send(RESIZE, json.dumps({"Width": width, "Height": height}).encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _output(self, write) -> None:
        pending = bytearray()
        try:
            while True:
                for event in self.ws.events():
                    if isinstance(event, (BytesMessage, TextMessage)):
                        pending += event.data if isinstance(event, BytesMessage) else event.data.encode()
                        if not event.message_finished:
                            continue
                        channel, data = (pending[0], bytes(pending[1:])) if pending else (None, b"")
                        pending.clear()
                        if channel == ERROR:
                            self.status = json.loads(data)
                        elif channel in (STDOUT, STDERR) and data:
                            try:
                                write(channel, data)
                            except BrokenPipeError:
                                # The reader went away (`... | head -1`): end the
                                # session, which ends the command at its kubelet.
                                self.reader_gone = True
                                return
                    elif isinstance(event, Ping):
                        await self._send(event.response())
                    elif isinstance(event, CloseConnection):
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            await self._send(event.response())
                        return
                if not await self._receive():
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


# -- the program ------------------------------------------------------------------------

def _connect(node_ns: str, address: str) -> trio.SocketStream:
    try:
        sock = netns.connect_in(node_ns, (address, kubeletport.PORT), kubeletport.CONNECT_TIMEOUT)
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise ExecError(f"error dialing backend: dial tcp {address}:{kubeletport.PORT}: {reason}") from None
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _write(channel: int, data: bytes) -> None:
    out = sys.stdout.buffer if channel == STDOUT else sys.stderr.buffer
    out.write(data)
    out.flush()


async def _read_stdin() -> bytes:
    # A thread, not trio's FdStream: that would make the descriptor (perhaps
    # the user's terminal, shared with the shell) non-blocking for everyone.
    return await trio.to_thread.run_sync(os.read, 0, READ_SIZE, abandon_on_cancel=True)


async def _terminal_sizes():
    """The terminal's size now, then at each SIGWINCH."""
    with trio.open_signal_receiver(signal.SIGWINCH) as changes:
        size = os.get_terminal_size(1)
        yield size.columns, size.lines
        async for _ in changes:
            size = os.get_terminal_size(1)
            yield size.columns, size.lines


async def run(node_ns: str, address: str, namespace: str, pod: str, container: str, command: list[str],
              tty: bool) -> int:
    stream = _connect(node_ns, address)
    async with stream:
        session = Session(stream, f"{address}:{kubeletport.PORT}",
                          exec_target(namespace, pod, container, command, stdin=True, tty=tty))
        await session.handshake()
        if not tty:
            return await session.serve(_read_stdin, _write)
        import termios
        import tty as ttys

        saved = termios.tcgetattr(0)
        # TCSANOW, not setraw's TCSAFLUSH: what was typed ahead goes to the command
        ttys.setraw(0, termios.TCSANOW)
        try:
            return await session.serve(_read_stdin, _write, _terminal_sizes())
        finally:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 7 or argv[5] != "--":
        print("usage: python -m netemu.node.kubeletexec NODE_NS ADDRESS NAMESPACE POD CONTAINER -- COMMAND...",
              file=sys.stderr)
        return 2
    node_ns, address, namespace, pod, container, _, *command = argv
    tty = os.isatty(0) and os.isatty(1)
    try:
        return trio.run(run, node_ns, address, namespace, pod, container, command, tty)
    except ExecError as e:
        print(f"netemu: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = 141
    # A stdin reader may still be blocked in a thread on the user's terminal:
    # leave without waiting for it.
    os._exit(code)
