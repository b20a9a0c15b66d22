"""`netemu shell NODE [--cluster C] [-- COMMAND...]`: a shell on a node, as if logged in to it.

The shell (the user's $SHELL, else /bin/bash) or COMMAND runs in the node's
network namespace and in a new UTS namespace whose hostname is the node's name,
so the prompt says `root@srv-k8s-master1` and the tutorial's commands run as
printed. This process becomes the shell (exec): nothing else is started, and
nothing is left once it exits; its status is the command's. The mount, pid and
user namespaces stay the machine's (files under /run/netemu are seen as
everywhere else), and the machine's own namespaces are never changed: setns and
unshare act on this process only. A shell still open at `netemu down` sits in the
node's network namespace, where teardown finds it by the namespace's inode.

kubectl inside the shell. On the tutorial's master kubectl had no kubeconfig and
took its default, localhost:8080. Here the user's own kubeconfig ($KUBECONFIG or
~/.kube/config) may well exist and send kubectl elsewhere: to another cluster's
context, or to a real cluster, where a `kubectl delete` typed "on the master"
would do real harm. So the shell sets KUBECONFIG to a file of the cluster's own
(in its state folder, gone at down) that names this cluster's API server as the
node sees it: http://localhost:8080 on the API server's node (the tutorial's
answer), http://<that node's eth0>:8080 on the others, as a kubelet's kubeconfig
points at its master. kubectl's discovery cache (KUBECACHEDIR) goes there too, so
that two clusters behind the same localhost:8080 never share a cache. Outside the
shell nothing changes. NETEMU_CLUSTER is set, so netemu's own verbs pick this
cluster.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

from netemu import names

SERVER_PORT = 8080


def register(sub, verb, with_cluster) -> None:
    sp = with_cluster(verb("shell", cmd_shell, "an interactive shell on a node (its network namespace, hostname "
                                               "= the node's name): netemu shell NODE [-- COMMAND...]"))
    sp.add_argument("node", metavar="NODE")
    sp.add_argument("command", nargs="*", help="run this instead of a shell and exit with its status (after --)")


def shell_argv(command: list[str], environ) -> list[str]:
    """What runs: COMMAND, else the user's login shell ($SHELL), else /bin/bash."""
    if command:
        return list(command)
    return [environ.get("SHELL") or "/bin/bash"]


def server_url(node: str, api_node: str, api_address: str | None) -> str:
    """The API server as NODE reaches it: its loopback on the API server's node,
    that node's eth0 address from the others."""
    if node == api_node or not api_address:
        return f"http://localhost:{SERVER_PORT}"
    return f"http://{api_address}:{SERVER_PORT}"


def kubeconfig_text(cluster: str, node: str, server: str) -> str:
    name = f"netemu-{cluster}-{node}"
    import yaml

    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": name, "user": {}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }, default_flow_style=False, sort_keys=False)


def shell_env(environ, cluster: str, node: str, kubeconfig: str, cache_dir: str) -> dict:
    env = dict(environ)
    env.update({"KUBECONFIG": kubeconfig, "KUBECACHEDIR": cache_dir, "HOSTNAME": node,
                names.CLUSTER_ENV: cluster, "NETEMU_NODE": node})
    return env


def shell_dir(cluster: str) -> str:
    return os.path.join(names.state_dir(cluster), "shell")


def _write_kubeconfig(cluster: str, node: str, server: str) -> str:
    folder = shell_dir(cluster)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{node}.kubeconfig")
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(kubeconfig_text(cluster, node, server))
    os.replace(tmp, path)
    return path


def cmd_shell(args) -> int:
    return run_shell(args.cluster, args.node, list(args.command or []))


def _api_node(cluster: str, store) -> tuple[str, str | None]:
    from netemu import clusterconfig
    from netemu.apiserver.__main__ import master_node
    from netemu.store import registry

    api_node = master_node(clusterconfig.read(cluster, store))
    obj = registry.get(store, "Node", None, api_node) or {}
    address = next((a["address"] for a in (obj.get("status") or {}).get("addresses") or []
                    if a.get("type") == "InternalIP"), None)
    return api_node, address


def run_shell(cluster_opt: str | None, node: str, command: list[str]) -> int:
    from netemu import cluster as clusters, netns
    from netemu.api import ApiError
    from netemu.store import registry
    from netemu.topology.names import pod_hostname

    cluster = clusters.resolve(cluster_opt)
    store = clusters.open_store(cluster)
    try:
        if registry.get(store, "Node", None, node) is None:
            raise ApiError(f'nodes "{node}" not found', reason="NotFound")
        api_node, api_address = _api_node(cluster, store)
    finally:
        store.close()
    namespace = names.node_ns(cluster, node)
    if not netns.exists(namespace):
        raise clusters.ClusterError(f'node "{node}" has no network namespace {namespace} (is it being removed?)')
    kubeconfig = _write_kubeconfig(cluster, node, server_url(node, api_node, api_address))
    env = shell_env(os.environ, cluster, node, kubeconfig, os.path.join(shell_dir(cluster), "kube-cache"))
    argv = shell_argv(command, os.environ)

    # From here on this process only: join the node's network namespace, make a
    # UTS namespace of its own named after the node, and become the command.
    netns.enter(namespace)
    if netns._libc.unshare(netns.CLONE_NEWUTS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUTS): {os.strerror(err)}")
    socket.sethostname(pod_hostname(node))
    sys.stdout.flush()
    sys.stderr.flush()
    from netemu.cli import exec_command
    try:
        exec_command(argv, env)
    except FileNotFoundError:
        # a shell's wording and status for a command that is not there
        print(f"netemu: {argv[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"netemu: {argv[0]}: permission denied", file=sys.stderr)
        return 126
    return 0  # not reached
