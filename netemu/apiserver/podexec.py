"""`kubectl exec` over WebSocket: the v5.channel.k8s.io (and v4) protocol.

kubectl 1.30+ asks `GET .../pods/P/exec?command=...&stdin=..&tty=..` with
`Upgrade: websocket` and `Sec-WebSocket-Protocol: v5.channel.k8s.io`. Every
binary message starts with its channel: 0 stdin (client to server), 1 stdout,
2 stderr, 3 error (a Status when the command ends: Success, or NonZeroExitCode
with the code in details.causes), 4 resize (JSON {"Width","Height"}); v5 adds a
message [255, channel] closing one stream (kubectl closes stdin so). The
command runs in the pod's namespaces as `netemu exec` runs it (nsenter into the
sandbox's network and UTS namespaces), on pipes, or on a pseudo-terminal with tty=true.

WebSocket framing is wsproto's (sans-I/O, like h11); the handshake is done on
the h11 connection, which then hands over its stream.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import subprocess
import termios

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

log = logging.getLogger("netemu.apiserver.exec")

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
DRAIN = 1.0                     # seconds to send what is left in the pipes after the process ends


def accept_token(key: str) -> str:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return generate_accept_token(key.encode()).decode()


def choose_protocol(offered: str | None) -> str | None:
    wanted = [p.strip() for p in (offered or "").split(",") if p.strip()]
    return next((p for p in wanted if p in PROTOCOLS), None)


def exit_status(code: int, command: list[str]) -> dict:
    """The Status written on the error channel when the command ends."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"[{' '.join(command)}], exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def _set_window(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _controlling_tty() -> None:                 # in the child, before exec
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Session:
    """One exec: a process and a WebSocket, until the process ends."""

    def __init__(self, argv: list[str], env: dict, command: list[str], protocol: str,
                 stdin: bool, stdout: bool, stderr: bool, tty: bool):
        self.argv, self.env, self.command, self.protocol = argv, env, command, protocol
        self.want_stdin, self.want_stdout, self.want_stderr, self.tty = stdin, stdout, stderr, tty
        self.ws = Connection(ConnectionType.SERVER)
        self.send_lock = trio.Lock()

    async def _flush(self, stream: trio.abc.Stream, data: bytes) -> None:
        if data:
            async with self.send_lock:
                await stream.send_all(data)

    async def _send(self, stream: trio.abc.Stream, channel: int, data: bytes) -> None:
        await self._flush(stream, self.ws.send(BytesMessage(data=bytes([channel]) + data)))

    async def run(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        master = None
        if self.tty:
            master, slave = os.openpty()
            proc = await trio.lowlevel.open_process(
                self.argv, stdin=slave, stdout=slave, stderr=slave, env=self.env,
                preexec_fn=_controlling_tty)
            os.close(slave)
            out = trio.lowlevel.FdStream(master)
            outputs = [(STDOUT, out)]
            stdin_sink = out
        else:
            proc = await trio.lowlevel.open_process(
                self.argv, stdin=subprocess.PIPE if self.want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env, start_new_session=True)
            outputs = [(STDOUT, proc.stdout), (STDERR, proc.stderr)]
            stdin_sink = proc.stdin
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_client, stream, trailing, stdin_sink, master, nursery.cancel_scope)
                async with trio.open_nursery() as pumps:
                    for channel, source in outputs:
                        pumps.start_soon(self._pump, stream, channel, source)
                    code = await proc.wait()
                    # Output still in the pipes is sent; a background process that
                    # keeps them open does not hold the session past DRAIN.
                    pumps.cancel_scope.deadline = trio.current_time() + DRAIN
                await self._send(stream, ERROR, json.dumps(exit_status(code, self.command)).encode())
                await self._flush(stream, self.ws.send(CloseConnection(code=CloseReason.NORMAL_CLOSURE)))
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass                                     # the client went away
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    try:
                        # Its own session (setsid): the whole group goes, as the
                        # kubelet stops an exec whose client hung up.
                        os.killpg(proc.pid, 9)
                    except ProcessLookupError:
                        pass
                    await proc.wait()
            if master is not None:
                with trio.CancelScope(shield=True):
                    await out.aclose()

    async def _pump(self, stream: trio.abc.Stream, channel: int, source) -> None:
        wanted = self.want_stdout if channel == STDOUT else self.want_stderr
        while True:
            try:
                data = await source.receive_some(65536)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return                  # a pty's reads fail with EIO once the process is gone
            if not data:
                return
            if wanted:
                await self._send(stream, channel, data)

    async def _read_client(self, stream: trio.abc.Stream, trailing: bytes, stdin_sink, master,
                           scope: trio.CancelScope) -> None:
        if trailing:
            self.ws.receive_data(trailing)
        pending = bytearray()
        while True:
            for event in self.ws.events():
                if isinstance(event, Ping):
                    await self._flush(stream, self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    # The client's close: answered, unless it answers ours.
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._flush(stream, self.ws.send(event.response()))
                    scope.cancel()
                    return
                elif isinstance(event, (BytesMessage, TextMessage)):
                    data = event.data if isinstance(event, BytesMessage) else event.data.encode()
                    pending += data
                    if event.message_finished:
                        await self._message(bytes(pending), stdin_sink, master)
                        pending.clear()
            data = await stream.receive_some(65536)
            if not data:
                scope.cancel()
                return
            self.ws.receive_data(data)

    async def _message(self, message: bytes, stdin_sink, master) -> None:
        if not message:
            return
        channel, data = message[0], message[1:]
        if channel == STDIN and stdin_sink is not None and data:
            try:
                await stdin_sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        elif channel == RESIZE and master is not None:
            try:
                size = json.loads(data)
                _set_window(master, int(size["Width"]), int(size["Height"]))
            except (ValueError, KeyError, TypeError, OSError):
                pass
        elif channel == CLOSE and data[:1] == bytes([STDIN]) and self.protocol == PROTOCOLS[0]:
            if stdin_sink is not None and not self.tty:
                await stdin_sink.aclose()
            elif self.tty:
                await stdin_sink.send_all(b"\x04")      # end of input on a terminal: ^D
