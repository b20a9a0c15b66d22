"""pods/exec, pods/attach and pods/portforward: the upgrade, in either protocol.

    GET  .../exec|attach       Upgrade: websocket, v5/v4.channel.k8s.io      kubectl 1.30+
    POST .../exec|attach       Upgrade: SPDY/3.1, X-Stream-Protocol-Version  kubectl up to 1.29
    GET  .../portforward       Upgrade: websocket, SPDY/3.1+portforward.k8s.io (kubectl 1.31+)
                               or v4.channel.k8s.io with ports=P (the Python client)
    POST .../portforward       Upgrade: SPDY/3.1, portforward.k8s.io         every kubectl

The request is checked (pod, container, sandbox) before the 101; afterwards the
session is podexec's or portforward's. kubectl falls back from a refused
WebSocket upgrade to SPDY, so either answer is what kube-apiserver gives.
"""

from __future__ import annotations

from netemu import names, netns
from netemu.apiserver import podexec, portforward, status
from netemu.apiserver.http import Request, Response

SPDY = "spdy/3.1"


def _flag(req: Request, name: str, default: str = "false") -> bool:
    return (req.arg(name) or default) in ("true", "1")


def _offered(req: Request, header: str) -> str:
    return req.headers.get(header) or ""


def _upgrade(req: Request, websocket_protocols: tuple[str, ...], spdy_protocols: tuple[str, ...]):
    """(transport, protocol, headers of the 101) for the upgrade asked, or a Response refusing it."""
    upgrade = (req.headers.get("upgrade") or "").lower()
    if upgrade == "websocket" and req.headers.get("sec-websocket-key"):
        protocol = podexec.choose_protocol(_offered(req, "sec-websocket-protocol"), websocket_protocols)
        if protocol is None:
            return status.bad_request("unable to upgrade connection: the WebSocket subprotocols offered "
                                      f"({_offered(req, 'sec-websocket-protocol') or 'none'}) are not served: "
                                      f"netemu serves {', '.join(websocket_protocols)}")
        return "websocket", protocol, [
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", podexec.accept_token(req.headers["sec-websocket-key"])),
            ("Sec-WebSocket-Protocol", protocol)]
    if upgrade == SPDY:
        protocol = podexec.choose_protocol(_offered(req, "x-stream-protocol-version"), spdy_protocols)
        if protocol is None:
            return status.bad_request("unable to upgrade connection: the stream protocols offered "
                                      f"({_offered(req, 'x-stream-protocol-version') or 'none'}) are not "
                                      f"served: netemu serves {', '.join(spdy_protocols)} over SPDY/3.1")
        return "spdy", protocol, [("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade"),
                                  ("X-Stream-Protocol-Version", protocol)]
    return status.bad_request("unable to upgrade connection: Upgrade request required "
                              "(websocket or SPDY/3.1)")


def container_of(req: Request, pod: dict, name: str) -> str | Response:
    """The container an exec or attach asks for (the only one when it names
    none), or the refusal."""
    containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
    container = req.arg("container") or (containers[0] if len(containers) == 1 else None)
    if container is None:
        return status.bad_request(f"a container name must be specified for pod {name}, "
                                  f"choose one of: [{' '.join(containers)}]")
    if container not in containers:
        return status.bad_request(f"container {container} is not valid for pod {name}")
    return container


def _sandbox(server, pod: dict, namespace: str, name: str, container: str):
    """The running pod's sandbox as its kubelet published it on the Pod
    (netemu.io/sandbox, not the kubelet's file), with the network namespace
    netemu names for the pod and a pause PID checked to live in it; or the
    kubelet's refusal."""
    import dataclasses

    from netemu.node import sandbox as sandboxes

    pause_pid = sandboxes.pause_pid_of(server.cluster, pod) if server.cluster else None
    phase = (pod.get("status") or {}).get("phase")
    if pause_pid is None or phase in ("Succeeded", "Failed") or pod["metadata"].get("deletionTimestamp"):
        return status.bad_request(f'unable to upgrade connection: container not found ("{container}")')
    return dataclasses.replace(sandboxes.published(pod), namespace=names.pod_ns(server.cluster, namespace, name),
                               pause_pid=pause_pid)


def _container_stream(server, req: Request, pod: dict, namespace: str, name: str):
    """What exec and attach check before the 101, in kube-apiserver's order:
    the container, the upgrade asked, the running sandbox. (container,
    sandbox, (transport, protocol, headers)), or the Response refusing it."""
    container = container_of(req, pod, name)
    if isinstance(container, Response):
        return container
    upgrade = _upgrade(req, podexec.PROTOCOLS, podexec.SPDY_PROTOCOLS)
    if isinstance(upgrade, Response):
        return upgrade
    sandbox = _sandbox(server, pod, namespace, name, container)
    if isinstance(sandbox, Response):
        return sandbox
    return container, sandbox, upgrade


def exec_(server, req: Request, pod: dict, namespace: str, name: str) -> Response:
    """`kubectl exec`: a command in the pod's namespaces (podexec.Session)."""
    if req.method not in ("GET", "POST"):
        return status.method_not_allowed()
    command = req.query.get("command") or []
    if not command or not command[0]:
        return status.bad_request("you must specify at least one command for the container")
    checked = _container_stream(server, req, pod, namespace, name)
    if isinstance(checked, Response):
        return checked
    container, sandbox, (transport, protocol, headers) = checked
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    tty = _flag(req, "tty")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOSTNAME": name, "NETEMU_POD": f"{namespace}/{name}",
           "NETEMU_CONTAINER": container, "HOME": "/root"}
    if server.cluster:
        env["NETEMU_CLUSTER"] = server.cluster
    if tty:
        env["TERM"] = "xterm"
    for item in spec.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
    session = podexec.Session(netns.exec_argv(sandbox.namespace, command, uts_pid=sandbox.pause_pid),
                              env, command, protocol, stdin=_flag(req, "stdin"),
                              stdout=_flag(req, "stdout", "true"),
                              stderr=_flag(req, "stderr", "true") and not tty, tty=tty, transport=transport)
    return Response(101, b"", headers=headers, upgrade=session.run)


def _instance(pod: dict | None, container: str) -> tuple | None:
    """Which instance of CONTAINER runs now: (restartCount, startedAt), or None
    when it does not run (the pod gone, finished, or the container stopped)."""
    if pod is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            running = (cs.get("state") or {}).get("running")
            return (cs.get("restartCount", 0), running.get("startedAt")) if running is not None else None
    return None


def attach(server, req: Request, pod: dict, namespace: str, name: str, read) -> Response:
    """`kubectl attach`: the container's output from now on (podexec.AttachSession),
    until the instance attached to stops (READ() -> the pod now, or None)."""
    if req.method not in ("GET", "POST"):
        return status.method_not_allowed()
    checked = _container_stream(server, req, pod, namespace, name)
    if isinstance(checked, Response):
        return checked
    container, sandbox, (transport, protocol, headers) = checked
    if _flag(req, "tty"):
        # kubectl asks for a TTY only when the container has one (spec.tty);
        # netemu's containers never do.
        return status.bad_request(f"unable to upgrade connection: container {container} in pod {name} "
                                  "has no TTY (netemu's kubelet gives containers none)")
    instance = _instance(pod, container)
    if instance is None:
        return status.bad_request(f'unable to upgrade connection: container not found ("{container}")')
    log_path = names.container_log(server.pod_dir(namespace, name), container)
    try:
        open(log_path, "rb").close()
    except OSError:
        return status.bad_request(f'unable to upgrade connection: container not found ("{container}")')
    spec = next((c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == container), {})
    session = podexec.AttachSession(log_path, lambda: _instance(read(), container) == instance,
                                    stdout=_flag(req, "stdout", "true"), stderr=_flag(req, "stderr", "true"),
                                    transport=transport, protocol=protocol, stdin=_flag(req, "stdin"),
                                    stdin_path=names.container_stdin(server.pod_dir(namespace, name), container)
                                    if spec.get("stdin") else None, stdin_once=bool(spec.get("stdinOnce")))
    return Response(101, b"", headers=headers, upgrade=session.run)


def port_forward(server, req: Request, pod: dict, namespace: str, name: str) -> Response:
    """`kubectl port-forward` (portforward.PortForwarder), SPDY or SPDY in a WebSocket."""
    if req.method not in ("GET", "POST"):
        return status.method_not_allowed()
    upgrade = _upgrade(req, (portforward.WEBSOCKET_PROTOCOL, portforward.CHANNEL_PROTOCOL), (portforward.PROTOCOL,))
    if isinstance(upgrade, Response):
        return upgrade
    transport, protocol, headers = upgrade
    ports: list[int] = []
    if protocol == portforward.CHANNEL_PROTOCOL:
        try:
            ports = portforward.parse_ports(req.query.get("ports") or req.query.get("port") or [])
        except ValueError as err:
            return status.bad_request(str(err))
        if not ports:
            return status.bad_request("at least one port must be specified (ports=PORT)")
    containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
    sandbox = _sandbox(server, pod, namespace, name, containers[0] if containers else "")
    if isinstance(sandbox, Response):
        return sandbox
    if ports:
        forwarder = portforward.ChannelForwarder(sandbox.namespace, f"{namespace}/{name}", ports)
        return Response(101, b"", headers=headers, upgrade=forwarder.run)
    forwarder = portforward.PortForwarder(sandbox.namespace, f"{namespace}/{name}")

    async def run(stream, trailing: bytes) -> None:
        if transport == "websocket":
            stream, trailing = portforward.WebSocketBytes(stream, trailing), b""
        await forwarder.run(stream, trailing)

    return Response(101, b"", headers=headers, upgrade=run)
