"""netemu's Kubernetes API server (issue 13): the real kubectl's way into a cluster.

    python -m netemu.apiserver CLUSTER      (run by the control plane, supervised)

It listens where the tutorial's master did, inside the master node's namespace on
127.0.0.1:8080 and on the node's eth0 address, port 8080 (insecure, no auth), and
on the machine's loopback at a port chosen at `netemu up` (the one thing netemu
places in the machine's own namespace; it goes with the cluster). `up` adds a
kubeconfig context for that port (kubeconfig.py).

    server.py      routes over the store and admission (netemu.api)
    http.py        HTTP/1.1 on trio and h11
    discovery.py   /api, /apis, resource lists
    tables.py      server-side Tables for `kubectl get`
    status.py      Status errors
"""

from __future__ import annotations

import json
import os
import socket

from netemu import names

INSECURE_PORT = 8080


def config_path(cluster: str) -> str:
    return os.path.join(names.state_dir(cluster), "apiserver.json")


def prepare(cluster: str, add_context: bool = True) -> dict:
    """At `up`, before the control plane starts: choose the loopback port, note
    it in the state directory, and add the kubeconfig context for it (unless
    not ADD_CONTEXT: then no kubeconfig is touched, now or at down)."""
    from netemu.apiserver import kubeconfig

    with socket.socket() as s:
        # A free port now; the server binds it moments later. (Another program
        # taking it in between makes the server fail, loudly, in its log.)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = kubeconfig.default_path() if add_context else None
    config = {"port": port, "kubeconfig": path}
    with open(config_path(cluster), "w") as f:
        json.dump(config, f)
    if path is not None:
        kubeconfig.add(path, cluster, f"http://127.0.0.1:{port}")
    return config


def read_config(cluster: str) -> dict | None:
    try:
        with open(config_path(cluster)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def forget(cluster: str) -> None:
    """At down/clean: remove the kubeconfig context `up` added (and only it)."""
    from netemu.apiserver import kubeconfig

    config = read_config(cluster)
    if config is not None and "kubeconfig" in config and config["kubeconfig"] is None:
        return                      # up added no context (a throw-away cluster)
    path = (config or {}).get("kubeconfig") or kubeconfig.default_path()
    kubeconfig.remove(path, cluster)
