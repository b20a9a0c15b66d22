"""What the overlay daemons publish in the store (netemu.overlay.stats): flannel's
Node annotations, and the counters' rate rule and request/answer."""

from __future__ import annotations

import json
import threading
import time

from netemu.overlay import stats
from netemu.store.sqlite import SqliteStore


def test_node_annotations_are_flannels():
    vx = stats.node_annotations("vxlan", {"VNI": 1, "VtepMAC": "32:ae:4c:6b:5d:6f"}, "10.0.0.6", "kernel")
    assert vx == {"flannel.alpha.coreos.com/backend-type": "vxlan",
                  "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"32:ae:4c:6b:5d:6f"}',
                  "flannel.alpha.coreos.com/public-ip": "10.0.0.6",
                  "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                  "netemu.io/data-path": "kernel"}
    # A backend without data: flannel's JSON of a nil BackendData.
    assert stats.node_annotations("host-gw", {}, "10.0.0.7", "kernel")[
        "flannel.alpha.coreos.com/backend-data"] == "null"
    assert all(isinstance(v, str) for v in vx.values())      # annotations are strings


def test_publishing_is_rate_limited_and_only_on_change():
    a, b = {"counters": {"tx": 1}}, {"counters": {"tx": 2}}
    assert stats.worth_publishing(a, None, 0.0, 100.0, False)              # the first one
    assert not stats.worth_publishing(a, a, 0.0, 100.0, False)             # unchanged: never
    assert not stats.worth_publishing(b, a, 98.0, 100.0, False)            # changed, too soon
    assert stats.worth_publishing(b, a, 100.0 - stats.PUBLISH_PERIOD, 100.0, False)
    assert stats.worth_publishing(a, a, 99.9, 100.0, True)                 # asked for: at once


def test_collect_waits_for_the_answer_to_its_request(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"), create=True)
    store.put(stats.stats_key("n1"), {"counters": {"tx": 1}, "answers": 0})

    def daemon():
        # n1's daemon sees the request and answers it with fresh figures.
        while store.get(stats.request_key("n1")) is None:
            time.sleep(0.01)
        rev = store.get(stats.request_key("n1")).mod_revision
        store.put(stats.stats_key("n1"), {"counters": {"tx": 7}, "answers": rev})

    t = threading.Thread(target=daemon)
    t.start()
    got = stats.collect(store, ["n1"], timeout=10)
    t.join()
    assert got["n1"]["counters"] == {"tx": 7}


def test_collect_shows_the_last_record_of_a_silent_daemon(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"), create=True)
    store.put(stats.stats_key("n1"), {"counters": {"tx": 1}, "answers": 0})
    started = time.monotonic()
    got = stats.collect(store, ["n1", "n2"], timeout=0.3)
    assert time.monotonic() - started < 5
    assert got == {"n1": {"counters": {"tx": 1}}, "n2": None}
    assert json.loads(json.dumps(got))          # what `stats -o json` prints
