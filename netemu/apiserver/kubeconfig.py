"""The user's kubeconfig: one context per cluster, added at up, removed at down.

As kind does for `kind-<name>`: a cluster, a user and a context entry all named
`netemu-<cluster>`, written to the first file of $KUBECONFIG (else
~/.kube/config). The current context is set only when there is none, so `up`
never switches a user away from the cluster they were using. Removing takes out
exactly those three entries (and the current context if it was ours).
The file is rewritten atomically under a lock, as kubectl's own writes are.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

import yaml


def context_name(cluster: str) -> str:
    return f"netemu-{cluster}"


def default_path() -> str:
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    return first or os.path.join(os.path.expanduser("~"), ".kube", "config")


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".lock")


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a kubeconfig (expected a mapping)")
    data.setdefault("apiVersion", "v1")
    data.setdefault("kind", "Config")
    data.setdefault("preferences", {})
    for key in ("clusters", "users", "contexts"):
        if not isinstance(data.get(key), list):
            data[key] = []
    return data


def _save(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".kubeconfig-")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f, default_flow_style=False, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def entries(cluster: str, server: str) -> dict:
    """The kubeconfig of CLUSTER alone (`netemu kubeconfig`)."""
    name = context_name(cluster)
    return {"apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": name, "cluster": {"server": server}}],
            "users": [{"name": name, "user": {}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name}


def _without(items: list, name: str) -> list:
    return [i for i in items if not (isinstance(i, dict) and i.get("name") == name)]


def add(path: str, cluster: str, server: str) -> None:
    name = context_name(cluster)
    mine = entries(cluster, server)
    with _locked(path):
        data = _load(path)
        for key in ("clusters", "users", "contexts"):
            data[key] = _without(data[key], name) + mine[key]
        if not data.get("current-context"):
            data["current-context"] = name
        _save(path, data)


def remove(path: str, cluster: str) -> None:
    name = context_name(cluster)
    if not os.path.exists(path):
        return
    with _locked(path):
        data = _load(path)
        before = [len(data[k]) for k in ("clusters", "users", "contexts")]
        for key in ("clusters", "users", "contexts"):
            data[key] = _without(data[key], name)
        ours = data.get("current-context") == name
        if ours:
            data["current-context"] = ""
        if ours or before != [len(data[k]) for k in ("clusters", "users", "contexts")]:
            _save(path, data)
