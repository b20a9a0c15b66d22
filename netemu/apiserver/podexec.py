"""`kubectl exec` and `kubectl attach`: a process's (or a container's) stdio over
WebSocket (v5/v4.channel.k8s.io, kubectl 1.30+) or SPDY/3.1 (kubectl up to 1.29).

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

Over SPDY (spdy.py) the same five channels are streams the client opens, each
with a `streamtype` header (error, stdin, stdout, stderr, resize) that the
server acknowledges with a SYN_REPLY; the command starts once all the streams
the request asked for are open (the kubelet waits for them likewise). stdin
ends with a FIN on its stream; resize is a stream of JSON objects; the Status
goes on the error stream, then every stream gets its FIN and the connection a
GOAWAY. A transport (WebSocketChannels, SpdyChannels) hides which protocol it
is from the Session, which runs the command (or follows an attached
container's output: AttachSession).
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

from netemu.apiserver import spdy

log = logging.getLogger("netemu.apiserver.exec")

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
SPDY_PROTOCOLS = ("v4.channel.k8s.io",)     # the one with a Status on the error stream
STREAM_WAIT = 30.0              # seconds a SPDY client has to open the streams it asked for
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
DRAIN = 1.0                     # seconds to send what is left in the pipes after the process ends


def accept_token(key: str) -> str:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return generate_accept_token(key.encode()).decode()


def choose_protocol(offered: str | None, served: tuple[str, ...] = PROTOCOLS) -> str | None:
    wanted = [p.strip() for p in (offered or "").split(",") if p.strip()]
    return next((p for p in wanted if p in served), None)


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


STREAM_TYPES = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": ERROR, "resize": RESIZE}


class Input:
    """What a client sends, told to the session: stdin's bytes and end, resizes."""

    def __init__(self, stdin_sink, master: int | None, tty: bool):
        self.sink, self.master, self.tty = stdin_sink, master, tty

    async def stdin(self, data: bytes) -> None:
        if self.sink is not None and data:
            try:
                await self.sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def stdin_closed(self) -> None:
        if self.sink is None:
            return
        try:
            if self.tty:
                await self.sink.send_all(b"\x04")      # end of input on a terminal: ^D
            else:
                await self.sink.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def resize(self, data: bytes) -> None:
        if self.master is None:
            return
        try:
            size = json.loads(data)
            _set_window(self.master, int(size["Width"]), int(size["Height"]))
        except (ValueError, KeyError, TypeError, OSError):
            pass


class Channels:
    """A transport: the channels of one exec or attach over one connection."""

    send_lock: trio.Lock

    async def open(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        """Take the connection over (after the 101)."""
        self.stream = stream
        self.send_lock = trio.Lock()

    async def _flush(self, data: bytes) -> None:
        if data:
            async with self.send_lock:
                await self.stream.send_all(data)

    async def send(self, channel: int, data: bytes) -> None:
        raise NotImplementedError

    async def finish(self, status: dict) -> None:
        """Write STATUS on the error channel and close the session's side."""
        raise NotImplementedError

    async def serve(self, inp: Input) -> None:
        """Read the client until it closes or goes away, telling INP."""
        raise NotImplementedError


class WebSocketChannels(Channels):
    def __init__(self, protocol: str):
        self.protocol = protocol
        self.ws = Connection(ConnectionType.SERVER)

    async def open(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        await super().open(stream, trailing)
        if trailing:
            self.ws.receive_data(trailing)

    async def send(self, channel: int, data: bytes) -> None:
        await self._flush(self.ws.send(BytesMessage(data=bytes([channel]) + data)))

    async def finish(self, status: dict) -> None:
        await self.send(ERROR, json.dumps(status).encode())
        await self._flush(self.ws.send(CloseConnection(code=CloseReason.NORMAL_CLOSURE)))

    async def serve(self, inp: Input) -> None:
        pending = bytearray()
        while True:
            for event in self.ws.events():
                if isinstance(event, Ping):
                    await self._flush(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    # The client's close: answered, unless it answers ours.
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._flush(self.ws.send(event.response()))
                    return
                elif isinstance(event, (BytesMessage, TextMessage)):
                    data = event.data if isinstance(event, BytesMessage) else event.data.encode()
                    pending += data
                    if event.message_finished:
                        await self._message(bytes(pending), inp)
                        pending.clear()
            data = await self.stream.receive_some(65536)
            if not data:
                return
            self.ws.receive_data(data)

    async def _message(self, message: bytes, inp: Input) -> None:
        if not message:
            return
        channel, data = message[0], message[1:]
        if channel == STDIN:
            await inp.stdin(data)
        elif channel == RESIZE:
            inp.resize(data)
        elif channel == CLOSE and data[:1] == bytes([STDIN]) and self.protocol == PROTOCOLS[0]:
            await inp.stdin_closed()


class SpdyChannels(Channels):
    """The channels as SPDY streams the client opens (see the module's text)."""

    def __init__(self, expected: set[int]):
        self.expected = expected | {ERROR}
        self.conn = spdy.Connection()
        self.streams: dict[int, int] = {}           # channel -> stream id
        self.channel_of: dict[int, int] = {}        # stream id -> channel
        self.last_id = 0
        self.resize_buf = b""

    async def open(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        """Wait (at most STREAM_WAIT) for the streams the request asked for."""
        await super().open(stream, trailing)
        self.conn.receive_data(trailing)
        early: list = []
        with trio.move_on_after(STREAM_WAIT):
            while not self.expected <= self.streams.keys():
                for event in self.conn.events():
                    if isinstance(event, spdy.SynStream):
                        await self._accept(event)
                    elif isinstance(event, spdy.Ping):
                        await self._flush(self.conn.ping(event.ping_id))
                    else:
                        early.append(event)             # stdin sent before the last stream opened
                if self.expected <= self.streams.keys():
                    break
                data = await stream.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError("the client hung up before opening its streams")
                self.conn.receive_data(data)
        if not self.expected <= self.streams.keys():
            raise trio.BrokenResourceError("the client did not open the streams it asked for in time")
        self.early = early

    async def _accept(self, event: spdy.SynStream) -> None:
        channel = STREAM_TYPES.get(event.headers.get("streamtype", ""))
        self.last_id = max(self.last_id, event.stream_id)
        if channel is None or channel in self.streams:
            await self._flush(self.conn.rst_stream(event.stream_id, spdy.REFUSED_STREAM))
            return
        self.streams[channel] = event.stream_id
        self.channel_of[event.stream_id] = channel
        await self._flush(self.conn.syn_reply(event.stream_id, {}))

    async def send(self, channel: int, data: bytes) -> None:
        sid = self.streams.get(channel)
        if sid is not None and data:
            await self._flush(self.conn.data(sid, data))

    async def finish(self, status: dict) -> None:
        out = self.conn.data(self.streams[ERROR], json.dumps(status).encode(), fin=True)
        for channel in (STDOUT, STDERR):
            if channel in self.streams:
                out += self.conn.data(self.streams[channel], b"", fin=True)
        await self._flush(out + self.conn.goaway(self.last_id))

    async def serve(self, inp: Input) -> None:
        events = self.early
        while True:
            for event in events:
                if isinstance(event, spdy.Data):
                    channel = self.channel_of.get(event.stream_id)
                    if channel == STDIN:
                        await inp.stdin(event.data)
                        if event.fin:
                            await inp.stdin_closed()
                    elif channel == RESIZE:
                        self.resize_buf += event.data
                        for obj in self._json_objects():
                            inp.resize(obj)
                elif isinstance(event, spdy.SynStream):
                    await self._accept(event)
                elif isinstance(event, spdy.Ping):
                    await self._flush(self.conn.ping(event.ping_id))
                elif isinstance(event, spdy.GoAway):
                    return
            data = await self.stream.receive_some(65536)
            if not data:
                return
            self.conn.receive_data(data)
            try:
                events = self.conn.events()
            except spdy.ProtocolError as err:
                log.info("exec: %s", err)
                return

    def _json_objects(self) -> list[bytes]:
        """Whole JSON objects at the front of the resize stream (json.Encoder's
        output: objects one after the other, each ending in a newline)."""
        out = []
        decoder = json.JSONDecoder()
        text = self.resize_buf.decode("utf-8", "replace")
        at = 0
        while True:
            while at < len(text) and text[at].isspace():
                at += 1
            try:
                _, end = decoder.raw_decode(text, at)
            except ValueError:
                break
            out.append(text[at:end].encode())
            at = end
        self.resize_buf = text[at:].encode()
        return out


class Session:
    """One exec: a process and a client's channels, until the process ends."""

    def __init__(self, argv: list[str], env: dict, command: list[str], protocol: str,
                 stdin: bool, stdout: bool, stderr: bool, tty: bool, transport: str = "websocket"):
        self.argv, self.env, self.command, self.protocol = argv, env, command, protocol
        self.want_stdin, self.want_stdout, self.want_stderr, self.tty = stdin, stdout, stderr, tty
        if transport == "spdy":
            wanted = {STDIN: stdin, STDOUT: stdout, STDERR: stderr, RESIZE: tty}
            self.channels: Channels = SpdyChannels({c for c, on in wanted.items() if on})
        else:
            self.channels = WebSocketChannels(protocol)

    async def _start(self):
        """Start the source: (outputs [(channel, stream)], Input, master fd, closer)."""
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
        self.proc, self.out = proc, (out if master is not None else None)
        return outputs, Input(stdin_sink, master, self.tty)

    async def _wait(self) -> dict:
        """Until the source ends: the Status to send."""
        return exit_status(await self.proc.wait(), self.command)

    async def _stop(self) -> None:
        proc = self.proc
        if proc.returncode is None:
            try:
                # Its own session (setsid): the whole group goes, as the
                # kubelet stops an exec whose client hung up.
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            await proc.wait()
        if self.out is not None:
            await self.out.aclose()

    async def run(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        try:
            await self.channels.open(stream, trailing)
        except (trio.BrokenResourceError, trio.ClosedResourceError, spdy.ProtocolError) as err:
            log.info("exec: %s", err)
            return
        outputs, inp = await self._start()
        try:
            async with trio.open_nursery() as nursery:
                async def serve_client() -> None:
                    try:
                        await self.channels.serve(inp)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, spdy.ProtocolError) as err:
                        log.info("exec: %s", err)
                    nursery.cancel_scope.cancel()       # the client is gone or closed

                nursery.start_soon(serve_client)
                async with trio.open_nursery() as pumps:
                    for channel, source in outputs:
                        pumps.start_soon(self._pump, channel, source)
                    status = await self._wait()
                    # Output still in the pipes is sent; a background process that
                    # keeps them open does not hold the session past DRAIN.
                    pumps.cancel_scope.deadline = trio.current_time() + DRAIN
                try:
                    await self.channels.finish(status)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass                             # the client went away
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop()

    async def _pump(self, channel: int, source) -> None:
        wanted = self.want_stdout if channel == STDOUT else self.want_stderr
        while True:
            try:
                data = await source.receive_some(65536)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return                  # a pty's reads fail with EIO once the process is gone
            if not data:
                return
            if wanted:
                try:
                    await self.channels.send(channel, data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return              # the client is gone: serve_client ends the session


class LogFollower:
    """A container's log file read from where it ends now, as an output stream:
    what `kubectl attach` shows of a container whose stdin is not kept open."""

    def __init__(self, path: str, poll: float):
        self.f = open(path, "rb")
        self.f.seek(0, os.SEEK_END)
        self.poll = poll
        self.ended = False

    async def receive_some(self, size: int) -> bytes:
        while True:
            chunk = self.f.read(size)
            if chunk or self.ended:
                return chunk
            await trio.sleep(self.poll)


class AttachSession(Session):
    """`kubectl attach`: the container's output from now on, until it stops.

    netemu's kubelet starts a container's output in its log file, which is
    followed. Its stdin is /dev/null unless the container says `stdin: true`:
    then it is a FIFO the kubelet made (names.container_stdin), and the
    client's stdin is written into it (STDIN_PATH); a `stdinOnce` container's
    stdin goes to its first attach only, whose end is the container's end of
    input. Without one, a client's stdin is read and dropped, as for a
    container without `stdin: true` on a real node."""

    def __init__(self, log_path: str, running, stdout: bool, stderr: bool, transport: str, protocol: str,
                 stdin: bool = False, poll: float = 0.2, stdin_path: str | None = None,
                 stdin_once: bool = False):
        self.log_path, self.running, self.poll = log_path, running, poll
        self.stdin_path, self.stdin_once = stdin_path, stdin_once
        super().__init__([], {}, [], protocol, stdin=stdin, stdout=stdout, stderr=stderr, tty=False,
                         transport=transport)
        # The log holds stdout and stderr together: it goes out on stdout (or
        # stderr if only that was asked for).
        self.channel = STDOUT if stdout or not stderr else STDERR
        self.want_stdout = self.want_stderr = True

    async def _start(self):
        self.follower = LogFollower(self.log_path, self.poll)
        return [(self.channel, self.follower)], Input(self._open_stdin(), None, False)

    def _open_stdin(self):
        """The container's stdin FIFO opened for writing, or None: not asked
        for, not kept open by the container, not running, or (stdinOnce)
        taken by an earlier attach."""
        if not self.want_stdin or self.stdin_path is None:
            return None
        once = self.stdin_path + ".once"
        if self.stdin_once and os.path.exists(once):
            return None
        try:
            fd = os.open(self.stdin_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None                 # ENXIO: nobody reads it (the container is not running)
        if self.stdin_once:
            # Taken: the kubelet lets go of its write end, so this attach's
            # end is the container's end of input.
            with open(once, "w"):
                pass
        return trio.lowlevel.FdStream(fd)

    async def _wait(self) -> dict:
        while self.running():
            await trio.sleep(self.poll)
        self.follower.ended = True
        return exit_status(0, [])

    async def _stop(self) -> None:
        self.follower.f.close()
