"""SPDY/3.1 framing and header compression (netemu/apiserver/spdy.py), and the
exec, attach and port-forward sessions over it with a SPDY client in memory
(no root: plain local processes and in-memory streams; the namespaces are
tests/integration/test_apiserver.py's part)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import trio
from trio.testing import memory_stream_pair

from netemu.apiserver import podexec, portforward, spdy


def roundtrip(data: bytes, chunk: int = 0) -> list:
    conn = spdy.Connection()
    if chunk:
        events = []
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i:i + chunk])
            events += conn.events()
        return events
    conn.receive_data(data)
    return conn.events()


def test_dictionary_is_spdy3s():
    # 1423 bytes, starting with the length-prefixed "options" and ending with the
    # tail's "enq=0." (draft 3, 2.6.10.1); zlib names it by its Adler-32.
    assert len(spdy.DICTIONARY) == 1423
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"utf-,*,enq=0.")
    assert b"\x00\x00\x00\x06200 OK\x00\x00\x00\x07version" in spdy.DICTIONARY
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2


def test_control_frames_round_trip_byte_by_byte():
    client = spdy.Connection()
    wire = (client.syn_stream(1, {"streamType": "error", "Port": "80"}) +
            client.syn_stream(3, [("streamtype", "stdin"), ("x-multi", "a"), ("x-multi", "b")], fin=True) +
            client.ping(7) + client.rst_stream(3, spdy.CANCEL) + client.settings({4: 100}) +
            client.window_update(1, 1000) + client.goaway(3) + client.headers(1, {"a": "b"}))
    events = roundtrip(wire, chunk=1)           # one byte at a time: frames and zlib state survive splits
    assert events == [
        spdy.SynStream(1, {"streamtype": "error", "port": "80"}),
        spdy.SynStream(3, {"streamtype": "stdin", "x-multi": "a, b"}, fin=True),
        spdy.Ping(7), spdy.RstStream(3, spdy.CANCEL), spdy.Settings({4: 100}),
        spdy.WindowUpdate(1, 1000), spdy.GoAway(3, 0), spdy.Headers(1, {"a": "b"})]


def test_header_blocks_share_one_zlib_stream_per_direction():
    """The second block is compressed against the first: decoding it alone fails."""
    sender = spdy.Connection()
    first = sender.syn_stream(1, {"streamtype": "stdout"})
    second = sender.syn_stream(3, {"streamtype": "stdout"})
    assert len(second) < len(first)
    assert roundtrip(first + second)[1] == spdy.SynStream(3, {"streamtype": "stdout"})
    with pytest.raises(spdy.ProtocolError, match="cannot decompress"):
        roundtrip(second)


def test_header_block_format_and_compression_match_the_draft():
    block = spdy.encode_header_block({"Upgrade": "x", "port": "80"})
    assert block == (struct.pack(">I", 2) + struct.pack(">I", 7) + b"upgrade" + struct.pack(">I", 1) + b"x" +
                     struct.pack(">I", 4) + b"port" + struct.pack(">I", 2) + b"80")
    # A block compressed by plain zlib with the dictionary (as Go's framer does) is read.
    deflate = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 15, zdict=spdy.DICTIONARY)
    payload = struct.pack(">IIH", 5, 0, 0) + deflate.compress(block) + deflate.flush(zlib.Z_SYNC_FLUSH)
    frame = struct.pack(">HHI", 0x8003, spdy.SYN_STREAM, len(payload)) + payload
    assert roundtrip(frame) == [spdy.SynStream(5, {"upgrade": "x", "port": "80"})]
    # ... and ours is plain zlib with the dictionary.
    ours = spdy.Connection().syn_reply(5, {"a": "b"})
    inflate = zlib.decompressobj(zdict=spdy.DICTIONARY)
    assert spdy.decode_header_block(inflate.decompress(ours[12:])) == {"a": "b"}


def test_data_frames_fin_and_the_24_bit_limit():
    assert spdy.Connection.data(5, b"abc") == struct.pack(">II", 5, 3) + b"abc"
    assert spdy.Connection.data(5, b"", fin=True) == struct.pack(">II", 5, 0x01000000)
    big = b"x" * (spdy.MAX_FRAME + 10)
    events = roundtrip(spdy.Connection.data(9, big, fin=True))
    assert [(e.stream_id, len(e.data), e.fin) for e in events] == [(9, spdy.MAX_FRAME, False), (9, 10, True)]


def test_broken_frames_are_protocol_errors():
    with pytest.raises(spdy.ProtocolError, match="version 2"):
        roundtrip(struct.pack(">HHI", 0x8002, spdy.PING, 4) + b"\0\0\0\1")
    with pytest.raises(spdy.ProtocolError, match="shorter than"):
        roundtrip(struct.pack(">HHI", 0x8003, spdy.RST_STREAM, 4) + b"\0\0\0\1")
    deflate = zlib.compressobj(zdict=spdy.DICTIONARY)
    cut = deflate.compress(struct.pack(">I", 3) + struct.pack(">I", 2) + b"ab") + deflate.flush(zlib.Z_SYNC_FLUSH)
    payload = struct.pack(">IIH", 1, 0, 0) + cut
    with pytest.raises(spdy.ProtocolError, match="ends inside"):
        roundtrip(struct.pack(">HHI", 0x8003, spdy.SYN_STREAM, len(payload)) + payload)
    # unknown control frames (NOOP) are skipped; an incomplete frame waits
    assert roundtrip(struct.pack(">HHI", 0x8003, 5, 0)) == []
    assert roundtrip(struct.pack(">II", 1, 10) + b"abc") == []


class Client:
    """A SPDY client over an in-memory stream, opening streams as kubectl does."""

    def __init__(self, stream):
        self.stream, self.conn, self.next_id = stream, spdy.Connection(), 1
        self.ids: dict[str, int] = {}
        self.got: dict[int, bytes] = {}
        self.fins: set[int] = set()
        self.replies: set[int] = set()
        self.goaway = False

    async def open(self, streamtype: str, **headers) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.ids[f"{streamtype}{headers.get('requestid', '')}"] = sid
        await self.stream.send_all(self.conn.syn_stream(sid, {"streamtype": streamtype, **headers}))
        return sid

    async def send(self, sid: int, data: bytes, fin: bool = False) -> None:
        await self.stream.send_all(self.conn.data(sid, data, fin))

    async def read_until(self, done) -> None:
        with trio.fail_after(10):
            while not done():
                data = await self.stream.receive_some(65536)
                if not data:
                    return
                self.conn.receive_data(data)
                for ev in self.conn.events():
                    if isinstance(ev, spdy.Data):
                        self.got[ev.stream_id] = self.got.get(ev.stream_id, b"") + ev.data
                        if ev.fin:
                            self.fins.add(ev.stream_id)
                    elif isinstance(ev, spdy.SynReply):
                        self.replies.add(ev.stream_id)
                    elif isinstance(ev, spdy.GoAway):
                        self.goaway = True
                    elif isinstance(ev, spdy.Ping):
                        self.replies.add(-ev.ping_id)


def test_exec_over_spdy_stdin_fin_exit_status_and_ping():
    session = podexec.Session(["sh", "-c", "tr a-z A-Z; echo oops >&2; exit 2"], {"PATH": "/usr/bin:/bin"},
                              ["sh", "-c", "..."], "v4.channel.k8s.io", stdin=True, stdout=True, stderr=True,
                              tty=False, transport="spdy")

    async def main():
        client_stream, server_stream = memory_stream_pair()
        c = Client(client_stream)
        async with trio.open_nursery() as n:
            # The first stream goes with the 101's trailing bytes.
            first = c.conn.syn_stream(1, {"streamtype": "error"})
            c.next_id, c.ids["error"] = 3, 1
            n.start_soon(session.run, server_stream, first)
            stdin = await c.open("stdin")
            await c.open("stdout")
            await c.open("stderr")
            await client_stream.send_all(c.conn.ping(41))
            await c.send(stdin, b"hello\n", fin=True)
            await c.read_until(lambda: c.goaway)
        return c

    c = trio.run(main)
    assert c.replies >= {1, 3, 5, 7, -41}                       # every stream acknowledged; the ping answered
    assert c.got[c.ids["stdout"]] == b"HELLO\n" and c.got[c.ids["stderr"]] == b"oops\n"
    status = json.loads(c.got[c.ids["error"]])
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "2"}]
    assert {c.ids["error"], c.ids["stdout"], c.ids["stderr"]} <= c.fins


def test_exec_over_spdy_tty_resize_and_unknown_stream():
    session = podexec.Session(["sh", "-c", "sleep 0.3; stty size"], {"PATH": "/usr/bin:/bin"}, ["sh"],
                              "v4.channel.k8s.io", stdin=False, stdout=True, stderr=False, tty=True,
                              transport="spdy")

    async def main():
        client_stream, server_stream = memory_stream_pair()
        c = Client(client_stream)
        async with trio.open_nursery() as n:
            n.start_soon(session.run, server_stream, b"")
            await c.open("error")
            await c.open("stdout")
            bogus = await c.open("nosuch")
            resize = await c.open("resize")
            # json.Encoder's stream: objects one after another, one split over two frames
            await c.send(resize, b'{"Width":10,"Height":5}\n{"Width":132,')
            await c.send(resize, b'"Height":43}\n')
            await c.read_until(lambda: c.goaway)
        return c, bogus

    c, bogus = trio.run(main)
    assert bogus not in c.replies
    assert c.got[c.ids["stdout"]].strip() == b"43 132"
    assert json.loads(c.got[c.ids["error"]])["status"] == "Success"


def test_exec_over_spdy_gives_up_on_streams_never_opened(monkeypatch):
    monkeypatch.setattr(podexec, "STREAM_WAIT", 0.3)
    session = podexec.Session(["true"], {"PATH": "/usr/bin:/bin"}, ["true"], "v4.channel.k8s.io",
                              stdin=True, stdout=True, stderr=True, tty=False, transport="spdy")

    async def main():
        client_stream, server_stream = memory_stream_pair()
        c = Client(client_stream)
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(session.run, server_stream, b"")
                await c.open("error")                 # and never stdin, stdout, stderr
        return True

    assert trio.run(main)
    assert not hasattr(session, "proc")              # nothing was started


def test_attach_follows_the_log_from_its_end_until_the_instance_stops(tmp_path):
    log = tmp_path / "c.log"
    log.write_bytes(b"before attach\n")
    state = {"running": True}
    session = podexec.AttachSession(str(log), lambda: state["running"], stdout=True, stderr=True,
                                    transport="spdy", protocol="v4.channel.k8s.io", stdin=True, poll=0.05)

    async def main():
        client_stream, server_stream = memory_stream_pair()
        c = Client(client_stream)
        async with trio.open_nursery() as n:
            n.start_soon(session.run, server_stream, b"")
            await c.open("error")
            stdin = await c.open("stdin")
            await c.open("stdout")
            await c.open("stderr")
            await c.read_until(lambda: len(c.replies) == 4)
            await c.send(stdin, b"dropped\n")               # no stdin to attach to: read and dropped
            with open(log, "ab") as f:
                f.write(b"after 1\n")
                f.flush()
                await trio.sleep(0.2)
                f.write(b"after 2\n")
            state["running"] = False
            await c.read_until(lambda: c.goaway)
        return c

    c = trio.run(main)
    assert c.got[c.ids["stdout"]] == b"after 1\nafter 2\n"
    assert c.got[c.ids["stderr"]] == b""                     # the log goes out once, on stdout
    assert json.loads(c.got[c.ids["error"]])["status"] == "Success"


async def echo_server(stream) -> None:
    """The pod's side in tests: upper-cases what it gets, then closes when the client does."""
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            await stream.send_all(data.upper())


def test_port_forward_pairs_streams_by_request_and_copies_both_ways():
    async def main():
        connected = []

        async def connect(port: int):
            if port == 81:
                raise ConnectionRefusedError(111, "Connection refused")
            ours, pods = memory_stream_pair()
            connected.append(port)
            nursery.start_soon(echo_server, pods)
            return ours

        client_stream, server_stream = memory_stream_pair()
        c = Client(client_stream)
        fwd = portforward.PortForwarder("hp-ns", "default/web", connect=connect)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fwd.run, server_stream, b"")
            err0 = await c.open("error", port="80", requestid="0")
            await c.send(err0, b"", fin=True)                 # kubectl closes its half of the error stream
            data0 = await c.open("data", port="80", requestid="0")
            err1 = await c.open("error", port="81", requestid="1")
            data1 = await c.open("data", port="81", requestid="1")
            bad = await c.open("data", port="http", requestid="2")
            await c.send(data0, b"hello ")
            await c.send(data0, b"pod", fin=True)               # the client is done sending
            await c.read_until(lambda: {data0, err0, data1, err1} <= c.fins)
            await client_stream.send_all(c.conn.goaway(0))
            await client_stream.aclose()
        return c, (err0, data0, err1, data1, bad), connected

    c, (err0, data0, err1, data1, bad), connected = trio.run(main)
    assert connected == [80]
    assert c.got[data0] == b"HELLO POD"
    assert c.got.get(err0) == b""                               # no error for a good connection: an empty FIN
    assert c.got[err1].decode() == (
        'error forwarding port 81 to pod default/web: failed to connect to localhost:81 inside namespace '
        '"hp-ns": dial tcp4 127.0.0.1:81: connect: connection refused')
    assert bad not in c.replies


def test_port_forward_over_websocket_channels():
    """v4.channel.k8s.io: the port first on both channels, then data on 2i."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, CloseConnection

    assert portforward.parse_ports(["80,443", "8080"]) == [80, 443, 8080]
    with pytest.raises(ValueError, match="invalid port 'x'"):
        portforward.parse_ports(["80,x"])

    async def main():
        async def connect(port: int):
            ours, pods = memory_stream_pair()
            nursery.start_soon(echo_server, pods)
            return ours

        client_stream, server_stream = memory_stream_pair()
        ws = Connection(ConnectionType.CLIENT)
        got: list[bytes] = []
        fwd = portforward.ChannelForwarder("hp-ns", "default/web", [8080], connect=connect)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fwd.run, server_stream, b"")
            await client_stream.send_all(ws.send(BytesMessage(data=b"\x00abc")))
            with trio.fail_after(10):
                while len(got) < 3:
                    ws.receive_data(await client_stream.receive_some(65536))
                    got += [ev.data for ev in ws.events() if isinstance(ev, BytesMessage)]
            await client_stream.send_all(ws.send(CloseConnection(code=1000)))
            await client_stream.aclose()
        return got

    got = trio.run(main)
    assert sorted(got[:2]) == [b"\x00\x90\x1f", b"\x01\x90\x1f"]     # 8080 little-endian on both channels
    assert got[2] == b"\x00ABC"


def test_upgrade_negotiation_websocket_or_spdy():
    from netemu.apiserver import podstream
    from netemu.apiserver.http import Request, Response

    def req(**headers):
        return Request("POST", "/api/v1/namespaces/default/pods/p/exec", {}, headers, b"")

    transport, protocol, headers = podstream._upgrade(
        req(upgrade="SPDY/3.1", **{"x-stream-protocol-version": "v4.channel.k8s.io, v3.channel.k8s.io"}),
        podexec.PROTOCOLS, podexec.SPDY_PROTOCOLS)
    assert (transport, protocol) == ("spdy", "v4.channel.k8s.io")
    assert ("X-Stream-Protocol-Version", "v4.channel.k8s.io") in headers and ("Upgrade", "SPDY/3.1") in headers
    transport, protocol, headers = podstream._upgrade(
        req(upgrade="websocket", **{"sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                                   "sec-websocket-protocol": "SPDY/3.1+portforward.k8s.io"}),
        (portforward.WEBSOCKET_PROTOCOL, portforward.CHANNEL_PROTOCOL), (portforward.PROTOCOL,))
    assert (transport, protocol) == ("websocket", "SPDY/3.1+portforward.k8s.io")
    # kubectl 1.20 offers v2 and older too; without v4 there is no Status to carry an exit code.
    refused = podstream._upgrade(req(upgrade="SPDY/3.1", **{"x-stream-protocol-version": "v2.channel.k8s.io"}),
                                 podexec.PROTOCOLS, podexec.SPDY_PROTOCOLS)
    assert isinstance(refused, Response) and refused.status == 400
    assert json.loads(refused.body)["message"] == (
        "unable to upgrade connection: the stream protocols offered (v2.channel.k8s.io) are not served: "
        "netemu serves v4.channel.k8s.io over SPDY/3.1")
    refused = podstream._upgrade(req(), podexec.PROTOCOLS, podexec.SPDY_PROTOCOLS)
    assert json.loads(refused.body)["message"].startswith("unable to upgrade connection: Upgrade request required")


def test_spdy_client_vanishing_stops_the_command(tmp_path):
    marker = tmp_path / "still-running"
    session = podexec.Session(["sh", "-c", f"sleep 0.5; touch {marker}; sleep 30"], {"PATH": "/usr/bin:/bin"},
                              ["sh"], "v4.channel.k8s.io", stdin=False, stdout=True, stderr=True, tty=False,
                              transport="spdy")

    async def main():
        client_stream, server_stream = memory_stream_pair()
        c = Client(client_stream)
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(session.run, server_stream, b"")
                for streamtype in ("error", "stdout", "stderr"):
                    await c.open(streamtype)
                await c.read_until(lambda: len(c.replies) == 3)
                await client_stream.aclose()             # the client is gone
        await trio.sleep(1.0)

    trio.run(main)
    assert not marker.exists()                           # the whole process group was killed


def test_port_forward_spdy_tunnelled_in_websocket_messages():
    """kubectl 1.31+: SPDY frames carried in WebSocket binary messages, split anywhere."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, CloseConnection

    async def main():
        async def connect(port: int):
            ours, pods = memory_stream_pair()
            nursery.start_soon(echo_server, pods)
            return ours

        client_stream, server_stream = memory_stream_pair()
        ws, conn = Connection(ConnectionType.CLIENT), spdy.Connection()
        wire = (conn.syn_stream(1, {"streamtype": "error", "port": "80", "requestid": "0"}) +
                conn.syn_stream(3, {"streamtype": "data", "port": "80", "requestid": "0"}) +
                conn.data(3, b"through the tunnel", fin=True))
        fwd = portforward.PortForwarder("hp-ns", "default/web", connect=connect)
        got, fins = b"", set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fwd.run, portforward.WebSocketBytes(server_stream, b""), b"")
            for i in range(0, len(wire), 7):
                await client_stream.send_all(ws.send(BytesMessage(data=wire[i:i + 7])))
            with trio.fail_after(10):
                while fins != {1, 3}:
                    ws.receive_data(await client_stream.receive_some(65536))
                    for ev in ws.events():
                        if isinstance(ev, BytesMessage):
                            conn.receive_data(ev.data)
                    for ev in conn.events():
                        if isinstance(ev, spdy.Data):
                            got += ev.data if ev.stream_id == 3 else b""
                            if ev.fin:
                                fins.add(ev.stream_id)
            await client_stream.send_all(ws.send(CloseConnection(code=1000)))
            await client_stream.aclose()
        return got

    assert trio.run(main) == b"THROUGH THE TUNNEL"


def test_port_forward_gives_up_a_pair_whose_second_stream_never_comes(monkeypatch):
    monkeypatch.setattr(portforward, "PAIR_WAIT", 0.2)

    async def main():
        async def connect(port: int):
            raise AssertionError("no connection without both streams")

        client_stream, server_stream = memory_stream_pair()
        c = Client(client_stream)
        fwd = portforward.PortForwarder("hp-ns", "default/web", connect=connect)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fwd.run, server_stream, b"")
            err = await c.open("error", port="80", requestid="7")
            await c.read_until(lambda: err in c.fins)
            await client_stream.aclose()
        return c.got[err], fwd.pairs

    message, pairs = trio.run(main)
    assert message == b"request 7: timed out waiting for streams" and pairs == {}


def test_random_and_mutated_frames_give_events_or_protocol_errors_only():
    """A peer's garbage never raises anything but ProtocolError (the session
    catches that one and ends)."""
    import random

    rng = random.Random(13)
    good = spdy.Connection()
    samples = [good.syn_stream(1, {"streamtype": "stdin"}), good.syn_stream(3, {"port": "80", "requestid": "0"}),
               good.data(1, b"abc", fin=True), good.ping(1), good.rst_stream(1), good.goaway(3),
               good.settings({7: 65536}), good.window_update(1, 5), good.headers(1, {"a": "b"})]
    for i in range(5000):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        else:
            data = bytearray(rng.choice(samples))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        conn = spdy.Connection()
        conn.receive_data(bytes(data))
        try:
            events = conn.events()
        except spdy.ProtocolError:
            continue
        assert all(isinstance(e, (spdy.Data, spdy.SynStream, spdy.SynReply, spdy.Headers, spdy.RstStream,
                                  spdy.Settings, spdy.Ping, spdy.GoAway, spdy.WindowUpdate)) for e in events)
