"""node.synced: what a node's overlay and proxy say they have put in place,
and the lag `up` waits out (cluster.wait_ready)."""

from netemu import names
from netemu.node import synced


def test_a_part_lags_until_it_holds_every_wanted_revision(tmp_path, monkeypatch):
    monkeypatch.setattr(names, "node_dir", lambda cluster, node: str(tmp_path / cluster / node))
    (tmp_path / "c" / "n1").mkdir(parents=True)
    wanted = {"overlay": {"/subnets/": 10}, "proxy": {"/services/": 7, "/endpoints/": 9}}
    assert synced.lagging("c", "n1", wanted) == ["overlay", "proxy"]        # nothing said yet
    synced.mark("c", "n1", "overlay", {"/subnets/": 12})
    synced.mark("c", "n1", "proxy", {"/services/": 7, "/endpoints/": 8})
    assert synced.lagging("c", "n1", wanted) == ["proxy"]                   # endpoints 8 < 9
    synced.mark("c", "n1", "proxy", {"/services/": 7, "/endpoints/": 9})
    assert synced.lagging("c", "n1", wanted) == []
    assert synced.read("c", "n1", "proxy") == {"/services/": 7, "/endpoints/": 9}
    # A damaged or foreign file counts as nothing said.
    (tmp_path / "c" / "n1" / "overlay-synced.json").write_text("[1, 2")
    assert synced.lagging("c", "n1", wanted) == ["overlay"]
    (tmp_path / "c" / "n1" / "overlay-synced.json").write_text('{"/subnets/": "12"}')
    assert synced.lagging("c", "n1", wanted) == ["overlay"]


def test_up_waits_for_the_newest_lease_service_and_endpoints_on_every_node(tmp_path, monkeypatch):
    from netemu import cluster
    from netemu.overlay import leases
    from netemu.store import registry
    from netemu.store.sqlite import SqliteStore

    monkeypatch.setattr(names, "node_dir", lambda c, node: str(tmp_path / c / node))
    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    try:
        lease_rev = store.put(leases.SUBNETS + "10.244.1.0-24", {"PublicIP": "172.30.0.1"})
        svc_rev = store.put(registry.prefix("Service") + "default/web", {"spec": {}})
        ep_rev = store.put(registry.prefix("Endpoints") + "default/web", {"subsets": []})
        nodes = [{"metadata": {"name": n}} for n in ("n1", "n2")]
        for n in ("n1", "n2"):
            (tmp_path / "c" / n).mkdir(parents=True)
        assert cluster._data_path_late("c", store, nodes) == ["n1 (overlay, proxy)", "n2 (overlay, proxy)"]
        for n in ("n1", "n2"):
            synced.mark("c", n, "overlay", {leases.SUBNETS: lease_rev})
            synced.mark("c", n, "proxy", {registry.prefix("Service"): svc_rev,
                                          registry.prefix("Endpoints"): ep_rev})
        assert cluster._data_path_late("c", store, nodes) == []
        # A new lease: every node's overlay must take it before up returns.
        store.put(leases.SUBNETS + "10.244.2.0-24", {"PublicIP": "172.30.0.2"})
        assert cluster._data_path_late("c", store, nodes) == ["n1 (overlay)", "n2 (overlay)"]
    finally:
        store.close()


def test_up_follows_the_pods_from_the_change_log(tmp_path):
    """wait_ready's view of the pods: listed once, then only what changed read
    (and listed again if the change log it needs was compacted)."""
    from netemu import cluster
    from netemu.store import registry
    from netemu.store.base import Compacted
    from netemu.store.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    try:
        def pod(name, phase):
            return {"metadata": {"name": name, "namespace": "default"}, "status": {"phase": phase}}

        def put(name, phase):
            return store.put(registry.key("Pod", "default", name), pod(name, phase))

        put("a", "Pending")
        put("b", "Pending")
        followed = cluster._Followed(store, "Pod")
        seen = followed.refresh()
        assert [(p["metadata"]["name"], p["status"]["phase"]) for p in seen] == [("a", "Pending"), ("b", "Pending")]
        listed = followed.objects
        rev = put("b", "Running")
        put("c", "Pending")
        store.delete(registry.key("Pod", "default", "a"))
        store.put(registry.key("Node", None, "n1"), {"metadata": {"name": "n1"}})     # another kind
        seen = followed.refresh()
        assert followed.objects is listed                       # not listed again: the changes applied
        assert [(p["metadata"]["name"], p["status"]["phase"]) for p in seen] == [("b", "Running"), ("c", "Pending")]
        assert seen[0]["metadata"]["resourceVersion"] == str(rev)
        # The history it needs is gone: a list again.
        real = store.events_since

        def compacted(revision, prefix=""):
            raise Compacted("gone")
        store.events_since = compacted
        put("d", "Pending")
        seen = followed.refresh()
        store.events_since = real
        assert followed.objects is not listed
        assert [p["metadata"]["name"] for p in seen] == ["b", "c", "d"]
    finally:
        store.close()
