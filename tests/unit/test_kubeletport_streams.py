"""exec, attach and port-forward through a kubelet port (node/kubeletport.py,
node/kubeletexec.py): its paths, the exec client's query and exit status, and
a whole exec over real sockets without root: netemu exec's client, the API
server's relay, and a kubelet port's HTTP server running the command (a
plain local process: the pod namespaces are tests/integration/
test_machines_streams.py's part)."""

from __future__ import annotations

import json
import socket
import urllib.parse

import pytest
import trio
from wsproto.connection import ConnectionState

from netemu.apiserver import http, podexec, status
from netemu.node import kubeletexec, kubeletport


def test_the_kubelet_ports_paths():
    assert kubeletport.route("/containerLogs/default/web-1/c") == ("log", "default", "web-1", "c")
    assert kubeletport.route("/exec/kube-system/p/c") == ("exec", "kube-system", "p", "c")
    assert kubeletport.route("/attach/default/p/side") == ("attach", "default", "p", "side")
    assert kubeletport.route("/portForward/default/p") == ("portforward", "default", "p", None)
    for path in ("/exec/default/p", "/portForward/default/p/c", "/containerLogs/default/p/c/x", "/run/default/p/c",
                 "/exec//p/c", "/pods", "/"):
        assert kubeletport.route(path) is None, path
    # what the API server asks is what the port serves
    for sub, container in (("log", "c"), ("exec", "c"), ("attach", "c"), ("portforward", None)):
        path = kubeletport.kubelet_path(sub, "ns-1", "p-1", container)
        assert kubeletport.route(path) == (sub, "ns-1", "p-1", container), path
    assert kubeletport.kubelet_path("portforward", "default", "web", None) == "/portForward/default/web"


def test_the_exec_clients_query_asks_for_a_terminal_only_with_one():
    target = kubeletexec.exec_target("default", "web-2", "c", ["sh", "-c", "echo a b"], stdin=True, tty=False)
    path, _, query = target.partition("?")
    assert path == "/exec/default/web-2/c"
    assert urllib.parse.parse_qs(query) == {"command": ["sh", "-c", "echo a b"], "stdin": ["true"],
                                            "stdout": ["true"], "stderr": ["true"], "tty": ["false"]}
    q = urllib.parse.parse_qs(kubeletexec.exec_target("default", "p", "c", ["sh"], stdin=True, tty=True)
                              .partition("?")[2])
    assert (q["tty"], q["stderr"]) == (["true"], ["false"])       # a terminal's stderr is its stdout


def test_exit_status_from_the_kubelets_status():
    assert kubeletexec.exit_code(podexec.exit_status(0, ["true"])) == (0, None)
    assert kubeletexec.exit_code(podexec.exit_status(3, ["sh"])) == (3, None)
    assert kubeletexec.exit_code(podexec.exit_status(255, ["sh"])) == (255, None)
    code, message = kubeletexec.exit_code({"status": "Failure", "message": "container not found", "reason": "x"})
    assert (code, message) == (1, "container not found")
    code, message = kubeletexec.exit_code(None)
    assert code == 1 and "without the command's exit status" in message
    code, message = kubeletexec.exit_code({"status": "Failure", "reason": "NonZeroExitCode",
                                           "details": {"causes": [{"reason": "ExitCode", "message": "x"}]}})
    assert code == 1 and message


def exec_handler(calls: list):
    """A kubelet port's /exec, answered as podstream answers it, with the
    command run as a plain process (no pod namespaces without root)."""
    async def handle(req: http.Request) -> http.Response:
        calls.append((req.method, req.path, req.query, req.headers))
        if kubeletport.route(req.path) != ("exec", "default", "p", "c"):
            return status.not_found("pods", req.path)
        command = req.query["command"]
        if command == ["nosuch"]:
            return status.bad_request('unable to upgrade connection: container not found ("c")')
        protocol = podexec.choose_protocol(req.headers.get("sec-websocket-protocol"))
        session = podexec.Session(command, {"PATH": "/usr/bin:/bin"}, command, protocol,
                                  stdin=req.query["stdin"] == ["true"], stdout=True,
                                  stderr=req.query["stderr"] == ["true"], tty=req.query["tty"] == ["true"])
        return http.Response(101, b"", headers=[
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", podexec.accept_token(req.headers["sec-websocket-key"])),
            ("Sec-WebSocket-Protocol", protocol)], upgrade=session.run)
    return handle


def api_server_relaying_to(kubelet_stream):
    """The API server's part of _stream_elsewhere: the client's upgrade asked
    of the kubelet port on KUBELET_STREAM; its 101 passed on, then the bytes
    relayed; a refusal passed on as it came."""
    async def handle(req: http.Request) -> http.Response:
        target = req.path + "?" + urllib.parse.urlencode(req.query, doseq=True)
        code, headers, body, stream, trailing = await kubeletport.upgrade(
            kubelet_stream, "10.0.0.2:10250", req.method, target, req.headers)
        if stream is None:
            return http.Response(code, body)

        async def relay(client, client_trailing):
            await kubeletport.relay(client, client_trailing, stream, trailing)
        return http.Response(101, b"", headers=headers, upgrade=relay)
    return handle


def socket_streams():
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(trio.socket.from_stdlib_socket(b))


def run_exec(command: list[str], stdin_chunks: list[bytes], stdin_ends_after_the_close: bool = False):
    """netemu exec's client, through the relay, to the kubelet port's server:
    (exit status or ExecError, [(channel, bytes)] written, the requests the
    kubelet port saw)."""
    calls, written = [], []

    async def main():
        client_end, api_end = socket_streams()
        relay_end, kubelet_end = socket_streams()
        chunks = list(stdin_chunks)

        async def read_stdin():
            if stdin_ends_after_the_close:
                while session.ws.state is not ConnectionState.CLOSED:
                    await trio.sleep(0)
                return b""
            await trio.sleep(0.05)
            return chunks.pop(0) if chunks else b""

        async with trio.open_nursery() as n:
            n.start_soon(http.serve_connection, kubelet_end, exec_handler(calls), status.too_large,
                         status.bad_request)
            n.start_soon(http.serve_connection, api_end, api_server_relaying_to(relay_end), status.too_large,
                         status.bad_request)
            session = kubeletexec.Session(client_end, "10.0.0.2:10250",
                                          kubeletexec.exec_target("default", "p", "c", command, stdin=True,
                                                                  tty=False))
            with trio.fail_after(20):
                try:
                    await session.handshake()
                    result = await session.serve(read_stdin, lambda ch, data: written.append((ch, data)))
                except kubeletexec.ExecError as e:
                    result = e
                await client_end.aclose()
        return result

    return trio.run(main), written, calls


def test_exec_through_the_relay_carries_stdin_output_and_the_exit_status():
    result, written, calls = run_exec(["sh", "-c", "tr a-z A-Z; echo oops >&2; exit 3"], [b"hello ", b"pod\n"])
    assert result == 3
    assert b"".join(d for ch, d in written if ch == kubeletexec.STDOUT) == b"HELLO POD\n"
    assert b"".join(d for ch, d in written if ch == kubeletexec.STDERR) == b"oops\n"
    (method, path, query, headers), = calls
    # the kubelet saw the client's upgrade, passed on by the relay's request
    assert method == "GET" and path == "/exec/default/p/c"
    assert headers["upgrade"] == "websocket" and headers["sec-websocket-protocol"] == "v5.channel.k8s.io"
    assert headers["host"] == "10.0.0.2:10250"


def test_exec_through_the_relay_ends_with_the_command_and_its_status_zero():
    result, written, _ = run_exec(["sh", "-c", "echo done"], [])
    assert result == 0 and written == [(kubeletexec.STDOUT, b"done\n")]


def test_stdin_ending_just_after_the_command_is_no_error():
    # (netemu exec with an empty stdin once failed so: its close sent on a closed WebSocket)
    result, written, _ = run_exec(["sh", "-c", "echo done"], [], stdin_ends_after_the_close=True)
    assert result == 0 and written == [(kubeletexec.STDOUT, b"done\n")]


def test_a_refused_exec_comes_back_with_the_kubelets_words():
    result, written, _ = run_exec(["nosuch"], [])
    assert isinstance(result, kubeletexec.ExecError)
    assert str(result) == 'unable to upgrade connection: container not found ("c")'
    assert written == []


def test_the_relay_copies_both_ways_and_closes_both_when_one_side_ends():
    async def main():
        client, client_peer = socket_streams()
        kubelet, kubelet_peer = socket_streams()
        got = {}
        async with trio.open_nursery() as n:
            n.start_soon(kubeletport.relay, client_peer, b"early-from-client ", kubelet_peer, b"early-from-kubelet ")
            await client.send_all(b"to kubelet")
            await kubelet.send_all(b"to client")
            with trio.fail_after(5):
                got["kubelet"] = b""
                while len(got["kubelet"]) < len(b"early-from-client to kubelet"):
                    got["kubelet"] += await kubelet.receive_some(100)
                got["client"] = b""
                while len(got["client"]) < len(b"early-from-kubelet to client"):
                    got["client"] += await client.receive_some(100)
                await kubelet.aclose()                  # the kubelet's side ends the session ...
                got["client end"] = await client.receive_some(100)   # ... and the client's is closed
        return got

    got = trio.run(main)
    assert got == {"kubelet": b"early-from-client to kubelet", "client": b"early-from-kubelet to client",
                   "client end": b""}


def test_a_kubelet_port_that_does_not_speak_http_is_a_kubelet_error():
    async def main():
        ours, theirs = socket_streams()
        await theirs.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")
        with pytest.raises(kubeletport.KubeletError, match="error proxying to the kubelet port 10.0.0.2:10250"):
            await kubeletport.upgrade(ours, "10.0.0.2:10250", "GET", "/exec/default/p/c?command=true",
                                      {"upgrade": "websocket"})
    trio.run(main)


def test_the_port_refuses_other_nodes_pods_other_methods_and_other_paths(tmp_path):
    from netemu.store import registry
    from netemu.store.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    try:
        for node in ("n1", "n2"):
            registry.create(store, {"kind": "Node", "metadata": {"name": node}})
        registry.create(store, {"kind": "Pod", "metadata": {"name": "there", "namespace": "default"},
                                "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "nginx"}]}})
        registry.create(store, {"kind": "Pod", "metadata": {"name": "here", "namespace": "default"},
                                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx"}]}})
        handle = kubeletport.handler("hx-unit", "n1", store, None)

        def ask(method: str, path: str):
            resp = trio.run(handle, http.Request(method, path, {"command": ["true"]},
                                                 {"upgrade": "websocket"}, b""))
            return resp.status, json.loads(resp.body).get("message")

        # another node's pod, a pod that is not there: not found, whatever is asked of it
        for path in ("/exec/default/there/c", "/attach/default/there/c", "/portForward/default/there",
                     "/containerLogs/default/there/c", "/exec/default/nosuch/c", "/exec/other/here/c"):
            code, message = ask("GET", path)
            assert code == 404 and message.endswith("not found"), (path, code, message)
        assert ask("POST", "/exec/default/there/c")[0] == 404
        # methods: exec, attach and portForward take GET and POST (kubectl's SPDY
        # upgrade is a POST); containerLogs GET only
        for method, path in (("DELETE", "/exec/default/here/c"), ("PUT", "/portForward/default/here"),
                             ("POST", "/containerLogs/default/here/c")):
            assert ask(method, path)[0] == 405, (method, path)
        for path in ("/run/default/here/c", "/exec/default/here", "/pods", "/"):
            assert ask("GET", path)[0] == 404, path
    finally:
        store.close()
