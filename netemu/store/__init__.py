"""The cluster's state store: SQLite in its state folder (one machine), or an
etcd the user runs (`netemu up --store etcd://HOST:PORT`), under a key prefix of
the cluster's own, /netemu/<cluster>, so that several clusters share one etcd.

Which one a cluster uses is written at `up` in <state>/store.json (absent: the
SQLite file); every process of the cluster opens its store with open_store.
"""

from __future__ import annotations

import json
import os

from netemu import names


def config_path(cluster: str) -> str:
    return os.path.join(names.state_dir(cluster), "store.json")


def etcd_namespace(cluster: str) -> str:
    """The key prefix of CLUSTER's keys in a shared etcd (flannel's keys are
    then at /netemu/<cluster>/coreos.com/network, its --etcd-prefix)."""
    return f"/netemu/{cluster}"


def describe(cluster: str) -> str:
    """Where CLUSTER's store is, for messages and `netemu get`."""
    config = _config(cluster)
    if config is None:
        return names.store_path(cluster)
    return f"etcd {config['endpoint']} {config['namespace']}"


def _config(cluster: str) -> dict | None:
    try:
        with open(config_path(cluster)) as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(config, dict) or config.get("kind") != "etcd":
        raise ValueError(f"{config_path(cluster)}: not a store description netemu wrote")
    return config


def _record_etcd(cluster: str, host: str, port: int) -> None:
    tmp = config_path(cluster) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"kind": "etcd", "endpoint": f"{host}:{port}", "namespace": etcd_namespace(cluster)}, f)
    os.replace(tmp, config_path(cluster))


def join_etcd(cluster: str, endpoint: str):
    """Record that CLUSTER, which another machine brought up, keeps its state in
    the etcd at ENDPOINT (`netemu join`). Returns the open store."""
    from netemu.store.etcd import EtcdError, EtcdStore, parse_endpoint

    host, port = parse_endpoint(endpoint)
    try:
        store = EtcdStore(f"{host}:{port}", namespace=etcd_namespace(cluster))
    except EtcdError as e:
        raise ValueError(f"--store {endpoint}: {e}") from None
    _record_etcd(cluster, host, port)
    return store


def clusters_in_etcd(endpoint: str, config_key: str) -> list[str]:
    """The clusters whose settings (CONFIG_KEY, under each one's prefix) the
    etcd at ENDPOINT holds."""
    from netemu.store.etcd import EtcdError, EtcdStore, parse_endpoint

    host, port = parse_endpoint(endpoint)
    try:
        store = EtcdStore(f"{host}:{port}", namespace=etcd_namespace(""))
    except EtcdError as e:
        raise ValueError(f"--store {endpoint}: {e}") from None
    try:
        return sorted(k[:-len(config_key)] for k in store.keys("") if k.endswith(config_key))
    finally:
        store.close()


def use_etcd(cluster: str, endpoint: str):
    """Record that CLUSTER keeps its state in the etcd at ENDPOINT, after
    checking it answers and holds no keys under the cluster's prefix yet (a
    cluster of that name on another machine, or one not taken down). Returns
    the open store."""
    from netemu.store.etcd import EtcdError, EtcdStore, parse_endpoint

    host, port = parse_endpoint(endpoint)        # ValueError names the form
    namespace = etcd_namespace(cluster)
    try:
        store = EtcdStore(f"{host}:{port}", namespace=namespace)
    except EtcdError as e:
        raise ValueError(f"--store {endpoint}: {e}") from None
    left = store.list("")
    if left:
        store.close()
        raise ValueError(f"--store {endpoint}: etcd already holds keys of a cluster named \"{cluster}\" "
                         f"under {namespace} ({len(left)}, e.g. {left[0].key}); take it down, or pick "
                         "another --name")
    _record_etcd(cluster, host, port)
    return store


def open_store(cluster: str, create: bool = False):
    """CLUSTER's store. FileNotFoundError when it has none (not up)."""
    config = _config(cluster)
    if config is None:
        from netemu.store.sqlite import SqliteStore
        return SqliteStore(names.store_path(cluster), create=create)
    from netemu.store.etcd import EtcdStore
    return EtcdStore(config["endpoint"], namespace=config["namespace"])


def forget(cluster: str) -> str | None:
    """Delete CLUSTER's keys from its etcd (its part of a shared etcd, and only
    that); None when done or when it keeps no etcd, else why not."""
    try:
        config = _config(cluster)
    except ValueError as e:
        return str(e)
    if config is None:
        return None
    from netemu.store.etcd import EtcdError, EtcdStore
    try:
        store = EtcdStore(config["endpoint"], namespace=config["namespace"])
        try:
            store.delete_prefix("")
        finally:
            store.close()
    except (EtcdError, OSError) as e:
        return f"the cluster's keys in etcd {config['endpoint']} under {config['namespace']} remain: {e}"
    return None
