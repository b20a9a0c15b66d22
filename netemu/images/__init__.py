"""Container images, emulated: what process a container of a given image runs.

There is no image registry and no root filesystem per container: a container
runs a program from the machine's own filesystem inside its pod's namespaces.
  - A container with `command`/`args` runs exactly that (as Docker would with the
    image's ENTRYPOINT/CMD replaced).
  - Web-server images (nginx, httpd, and the tutorial's msfuko/nginx_8800) get a
    stand-in: busybox's httpd (about 1 MB of memory) on each declared TCP
    containerPort, serving a page that names the pod and the container.
  - A few base images keep their real default command (busybox: sh, ubuntu: bash),
    which, like the real thing without a terminal, exits at once.
  - Any other image with no command gets an idle process, and the kubelet records
    a warning event saying so.
"""

from __future__ import annotations

import dataclasses
import os

# image repository (without registry, tag or digest) -> port its server listens
# on when the manifest declares none
WEB_SERVERS = {
    "nginx": 80,
    "httpd": 80,
    "msfuko/nginx_8800": 8800,
    "library/nginx": 80,
    "library/httpd": 80,
}

BASE_IMAGES = {
    "busybox": ["sh"],
    "ubuntu": ["bash"],
    "debian": ["bash"],
    "alpine": ["sh"],
}


@dataclasses.dataclass
class Plan:
    argv: list[str]
    kind: str                      # "command", "web", "base", "idle"
    ports: list[int] = dataclasses.field(default_factory=list)
    www: str | None = None         # folder served by a web stand-in
    warning: str | None = None


def repository(image: str) -> str:
    """nginx:1.25 -> nginx; docker.io/msfuko/nginx_8800 -> msfuko/nginx_8800."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)
    if ":" in last[-1]:
        ref = ref[: ref.rfind(":")]
    parts = ref.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]            # drop the registry host
    return "/".join(parts)


def plan(container: dict, pod_name: str, container_dir: str) -> Plan:
    image = container.get("image", "")
    repo = repository(image)
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if command:
        return Plan(argv=command + args, kind="command")
    tcp_ports = [p["containerPort"] for p in container.get("ports") or []
                 if p.get("protocol", "TCP") == "TCP"]
    if repo in WEB_SERVERS:
        ports = tcp_ports or [WEB_SERVERS[repo]]
        www = os.path.join(container_dir, "www")
        return Plan(argv=web_argv(ports, www), kind="web", ports=ports, www=www)
    if args:
        return Plan(argv=args, kind="command")
    if repo in BASE_IMAGES:
        return Plan(argv=list(BASE_IMAGES[repo]), kind="base")
    return Plan(argv=["sleep", "infinity"], kind="idle",
                warning=f'image "{image}" is not emulated and the container has no command: '
                        f'running an idle process instead')


def web_argv(ports: list[int], www: str) -> list[str]:
    # One busybox httpd per port, in the foreground, logging each request to
    # stderr (the container's log). With several ports, a shell keeps them as one
    # container: if any server dies, the container exits.
    servers = [f"busybox httpd -f -vv -p {port} -h {www}" for port in ports]
    if len(servers) == 1:
        return servers[0].split()
    script = " & ".join(servers) + " & wait -n; exit 1"
    return ["bash", "-c", script]


def write_site(p: Plan, pod_name: str, container_name: str, node: str) -> None:
    if p.www is None:
        return
    os.makedirs(p.www, exist_ok=True)
    body = (f"<!DOCTYPE html>\n<title>{pod_name}</title>\n"
            f"<p>pod {pod_name}, container {container_name}, node {node}</p>\n")
    with open(os.path.join(p.www, "index.html"), "w") as f:
        f.write(body)
