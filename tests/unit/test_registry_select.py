"""registry.list_containing and registry.names_: a kubelet's start reads its own
node's pods and the names of all, decoding no other node's pod where the
SQLite store can filter; the same answers (after the caller's check) from a
store that cannot."""

from __future__ import annotations

from netemu.store import registry
from netemu.store.sqlite import SqliteStore


class PlainStore:
    """A Store without the SQLite store's extras (as the etcd store is)."""

    def __init__(self, inner: SqliteStore):
        self.inner = inner

    def list(self, prefix):
        return self.inner.list(prefix)


def pod(name: str, node: str, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}


def test_a_nodes_pods_and_every_pods_name(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    try:
        for name, node, ns in [("a", "n1", "default"), ("b", "n12", "default"), ("c", "n1", "kube-system"),
                               ("d", "n2", "default")]:
            registry.create(store, pod(name, node, ns))
        text = '"nodeName":"n1"'
        decoded = []
        real = store.list

        def counted(prefix):
            decoded.append(prefix)
            return real(prefix)

        store.list = counted
        mine = registry.list_containing(store, "Pod", text)
        assert sorted(p["metadata"]["name"] for p in mine) == ["a", "c"]    # n12's "b" is not even read
        assert all(p["metadata"]["resourceVersion"] for p in mine)
        names = sorted(registry.names_(store, "Pod"))
        assert names == [("default", "a"), ("default", "b"), ("default", "d"), ("kube-system", "c")]
        assert decoded == []                                                # neither call listed values

        plain = PlainStore(SqliteStore(store.path))
        every = registry.list_containing(plain, "Pod", text)
        assert sorted(p["metadata"]["name"] for p in every) == ["a", "b", "c", "d"]   # callers check
        assert sorted(registry.names_(plain, "Pod")) == names
        plain.inner.close()
    finally:
        store.close()
