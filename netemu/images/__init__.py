"""Container images, emulated: what process a container of a given image runs.

There is no image registry and no root filesystem per container: a container
runs a program from the machine's own filesystem inside its pod's namespaces.
Kubernetes' rule decides the argv, with each image's ENTRYPOINT and CMD as its
Dockerfile sets them: `command` replaces the ENTRYPOINT (and drops the CMD),
`args` replace the CMD and are given to the ENTRYPOINT.
  - A container with `command` runs exactly command + args.
  - Web-server images (nginx, httpd, and the tutorial's msfuko/nginx_8800) get a
    stand-in: busybox's httpd (about 1 MB of memory) on each declared TCP
    containerPort, serving a page that names the pod and the container. Args
    that start the server itself (`nginx -g ...`) are what the stand-in replaces
    (it notes that it ignores them); other args are a program the image's
    entrypoint would exec (nginx's docker-entrypoint.sh runs "$@"), so they run.
  - Base images have no ENTRYPOINT: args are the program, and without args their
    default command runs (busybox: sh, ubuntu: bash), which, like the real thing
    without a terminal, exits at once.
  - Any other image: its ENTRYPOINT is unknown, so neither it nor args meant for
    it can run (kube-dns's `--cache-size=1000` is not a program). It gets an
    idle process, and the kubelet records a warning event saying so.
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


# image repository (without registry, tag or digest) -> the argv[0]s of its CMD
# that start the server the stand-in replaces
SERVER_PROGRAMS = {
    "nginx": ("nginx", "nginx-debug"),
    "library/nginx": ("nginx", "nginx-debug"),
    "msfuko/nginx_8800": ("nginx", "nginx-debug"),
    "httpd": ("httpd-foreground", "httpd"),
    "library/httpd": ("httpd-foreground", "httpd"),
}


@dataclasses.dataclass
class Plan:
    argv: list[str]
    kind: str                      # "command", "web", "base", "idle"
    ports: list[int] = dataclasses.field(default_factory=list)
    www: str | None = None         # folder served by a web stand-in
    warning: str | None = None     # said as an ImageNotEmulated event
    note: str | None = None        # said as a Normal event
    problems: list[str] = dataclasses.field(default_factory=list)   # probes that cannot run


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
    command = [str(a) for a in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if command:
        return Plan(argv=command + args, kind="command")
    if repo in WEB_SERVERS:
        if args and os.path.basename(args[0]) not in SERVER_PROGRAMS.get(repo, ()):
            return Plan(argv=args, kind="command")
        tcp_ports = [p["containerPort"] for p in container.get("ports") or []
                     if p.get("protocol", "TCP") == "TCP"]
        ports = tcp_ports or [WEB_SERVERS[repo]]
        www = os.path.join(container_dir, "www")
        note = None
        if args:
            note = (f"the stand-in web server of image {image} ignores the server's arguments "
                    f"{' '.join(args[1:]) or '(none)'}")
        return Plan(argv=web_argv(ports, www), kind="web", ports=ports, www=www, note=note)
    if repo in BASE_IMAGES:
        if args:
            return Plan(argv=args, kind="command")
        return Plan(argv=list(BASE_IMAGES[repo]), kind="base")
    if args:
        warning = (f'image "{image}" is not emulated and the container has no command: its '
                   f'entrypoint is unknown, so it cannot be given the args {args!r}; '
                   f'running an idle process instead')
    else:
        warning = (f'image "{image}" is not emulated and the container has no command: '
                   f'running an idle process instead')
    return Plan(argv=["sleep", "infinity"], kind="idle", warning=warning)


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
