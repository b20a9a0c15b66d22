"""`netemu kubeconfig [--cluster N]`: the kubeconfig of a cluster's API server, as `kind get kubeconfig`."""

from __future__ import annotations

import yaml

from netemu import apiserver
from netemu.apiserver import kubeconfig


def register(sub, verb, with_cluster) -> None:
    with_cluster(verb("kubeconfig", cmd_kubeconfig,
                      "print the kubeconfig of a cluster's Kubernetes API (for kubectl --kubeconfig)",
                      root=False))


def cmd_kubeconfig(args) -> int:
    from netemu import cluster as clusters

    name = clusters.resolve(args.cluster)
    config = apiserver.read_config(name)
    if config is None:
        raise clusters.ClusterError(f"{apiserver.config_path(name)}: missing: cluster \"{name}\" "
                                    "has no API server (made before netemu served the API)")
    print(yaml.safe_dump(kubeconfig.entries(name, f"http://127.0.0.1:{config['port']}"),
                         default_flow_style=False, sort_keys=False), end="")
    return 0
