"""Container probes, as the kubelet's prober runs them.

Only probes a manifest declares run: a container without a readinessProbe is
ready once it runs (and, with a startupProbe, once that has succeeded). Each
probe has its own timing, with Kubernetes' defaults: initialDelaySeconds 0,
periodSeconds 10, timeoutSeconds 1, successThreshold 1, failureThreshold 3.
  - tcpSocket and httpGet connect from the node's network namespace to the pod's
    IP, as the kubelet does (so they cross docker0 and show in a capture of the
    pod's veth);
  - exec runs the command inside the container's namespaces; exit 0 is success.
A readiness failure makes the container unready (out of the endpoints); a
liveness or startup failure kills it, and restartPolicy decides what follows.

The parsing and the threshold counting are pure (tested without root); the
three actions are at the end.
"""

from __future__ import annotations

import dataclasses
import http.client
import socket
import ssl

import trio

from netemu import netns

DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1,
            "successThreshold": 1, "failureThreshold": 3}
KINDS = ("startupProbe", "livenessProbe", "readinessProbe")
WORDS = {"startupProbe": "Startup", "livenessProbe": "Liveness", "readinessProbe": "Readiness"}


@dataclasses.dataclass(frozen=True)
class Probe:
    kind: str                      # startupProbe | livenessProbe | readinessProbe
    action: str                    # tcpSocket | httpGet | exec
    port: int = 0
    host: str = ""                 # "" = the pod's IP
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple = ()
    command: tuple = ()
    initial_delay: float = 0
    period: float = 10
    timeout: float = 1
    success_threshold: int = 1
    failure_threshold: int = 3

    @property
    def word(self) -> str:
        return WORDS[self.kind]


def _number(spec: dict, field: str, minimum: int) -> int:
    value = spec.get(field)
    # A value the API server would have refused (or defaulted: 0 means unset
    # for the period and thresholds) falls back to the default, so that a pod
    # stored by other means never stops the prober.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return DEFAULTS[field]
    return value


def resolve_port(port, container: dict) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for p in container.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
    raise ValueError(f"port {port!r} is neither a number nor the name of one of the container's ports")


def parse(kind: str, spec: dict, container: dict) -> Probe:
    """KIND (livenessProbe, ...) of CONTAINER from its manifest SPEC. ValueError
    if it names no action or an unknown port."""
    timing = dict(initial_delay=_number(spec, "initialDelaySeconds", 0),
                  period=_number(spec, "periodSeconds", 1),
                  timeout=_number(spec, "timeoutSeconds", 1),
                  success_threshold=_number(spec, "successThreshold", 1),
                  failure_threshold=_number(spec, "failureThreshold", 1))
    if kind in ("livenessProbe", "startupProbe"):
        timing["success_threshold"] = 1      # Kubernetes: must be 1 for these
    if isinstance(spec.get("tcpSocket"), dict):
        action = spec["tcpSocket"]
        return Probe(kind, "tcpSocket", port=resolve_port(action.get("port"), container),
                     host=str(action.get("host") or ""), **timing)
    if isinstance(spec.get("httpGet"), dict):
        action = spec["httpGet"]
        path = str(action.get("path") or "/")
        headers = tuple((str(h.get("name", "")), str(h.get("value", "")))
                        for h in action.get("httpHeaders") or [] if isinstance(h, dict))
        return Probe(kind, "httpGet", port=resolve_port(action.get("port"), container),
                     host=str(action.get("host") or ""), path=path if path.startswith("/") else "/" + path,
                     scheme=str(action.get("scheme") or "HTTP").upper(), headers=headers, **timing)
    if isinstance(spec.get("exec"), dict):
        command = [str(a) for a in spec["exec"].get("command") or []]
        if not command:
            raise ValueError("exec: command is empty")
        return Probe(kind, "exec", command=tuple(command), **timing)
    raise ValueError("must have one of tcpSocket, httpGet, exec (grpc is not emulated)")


def probes_of(container: dict) -> tuple[dict[str, Probe], list[str]]:
    """The container's probes by kind, and one line per probe that cannot run."""
    out, problems = {}, []
    for kind in KINDS:
        spec = container.get(kind)
        if not isinstance(spec, dict):
            continue
        try:
            out[kind] = parse(kind, spec, container)
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{kind}: {e}")
    return out, problems


class Counter:
    """Consecutive results against a probe's thresholds, as the prober's worker
    keeps them. RESULT is the probe's verdict: it turns to success after
    successThreshold successes in a row and to failure after failureThreshold
    failures in a row. Readiness and startup start as failure, liveness as
    success (a container is alive until proven otherwise)."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.result = probe.kind == "livenessProbe"
        self.successes = 0
        self.failures = 0

    def add(self, ok: bool) -> str | None:
        """Count one outcome: "up" when RESULT turns to success, "down" when the
        probe has failed (readiness: turns unready; liveness and startup: the
        container must be killed), else None."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if not self.result and self.successes >= self.probe.success_threshold:
                self.result = True
                return "up"
            return None
        self.successes, self.failures = 0, self.failures + 1
        if self.failures < self.probe.failure_threshold:
            return None
        if self.result:
            self.result = False
            return "down"
        # A startup probe that never succeeded has failed once it reaches its threshold.
        if self.probe.kind == "startupProbe" and self.failures == self.probe.failure_threshold:
            return "down"
        return None


# -- the three actions ------------------------------------------------------------

def tcp_check(node_ns: str, ip: str, port: int, timeout: float) -> str | None:
    """None on success, else the failure as the kubelet words it."""
    with netns.inside(node_ns):
        s = socket.socket()
    try:
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
        except socket.timeout:
            return f"dial tcp {ip}:{port}: i/o timeout"
        except OSError as e:
            return f"dial tcp {ip}:{port}: connect: {(e.strerror or str(e)).lower()}"
        return None
    finally:
        s.close()


def http_check(node_ns: str, probe: Probe, ip: str, timeout: float) -> str | None:
    host = probe.host or ip
    url = f"{probe.scheme.lower()}://{host}:{probe.port}{probe.path}"
    with netns.inside(node_ns):
        sock = socket.socket()
    try:
        sock.settimeout(timeout)
        try:
            sock.connect((host, probe.port))
        except socket.timeout:
            return f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
        except OSError as e:
            return f'Get "{url}": dial tcp {host}:{probe.port}: connect: {(e.strerror or str(e)).lower()}'
        if probe.scheme == "HTTPS":
            # The kubelet does not verify a probe's certificate either.
            ctx = ssl._create_unverified_context()
            sock = ctx.wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPConnection(host, probe.port, timeout=timeout)
        conn.sock = sock
        headers = {"User-Agent": "kube-probe/1.37", "Accept": "*/*"}
        headers.update(dict(probe.headers))
        try:
            conn.request("GET", probe.path, headers=headers)
            status = conn.getresponse().status
        except socket.timeout:
            return f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
        except (OSError, http.client.HTTPException) as e:
            return f'Get "{url}": {e}'
        if 200 <= status < 400:
            return None
        return f"HTTP probe failed with statuscode: {status}"
    finally:
        sock.close()


async def exec_check(argv: list[str], env: dict, timeout: float) -> str | None:
    """ARGV is the probe's command already wrapped to enter the container."""
    result = None
    with trio.move_on_after(timeout) as scope:
        result = await trio.run_process(argv, env=env, check=False, capture_stdout=True,
                                        capture_stderr=True, stdin=b"")
    if scope.cancelled_caught or result is None:
        return f"command timed out after {timeout:g}s"
    if result.returncode == 0:
        return None
    output = (result.stdout + result.stderr).decode(errors="replace").strip()
    return output or f"command exited with {result.returncode}"
