"""What each node's overlay daemon tells the rest of the cluster, in the store.

Node facts, on the Node object, as flanneld's kube subnet manager writes them
(flannel pkg/subnet/kube): the annotations
    flannel.alpha.coreos.com/backend-type         udp | vxlan | host-gw
    flannel.alpha.coreos.com/backend-data         the lease's BackendData as JSON
                                                  ({"VNI":1,"VtepMAC":"..."}; null)
    flannel.alpha.coreos.com/public-ip            the node's underlay address
    flannel.alpha.coreos.com/kube-subnet-manager  "true" (spec.podCIDR is the lease)
and netemu's own netemu.io/data-path (who moves the packets). Written once when
the daemon has its backend up, and only if they differ from what is there.

Counters (`netemu stats`, `describe node`) are not Node annotations: a Node
write wakes every Node watcher, and counters change all the time. Each daemon
keeps one record under STATS/<node> (a plain store key beside flannel's lease
keys, no API object): the backend, lease, peers, data path, counters, its pid
and workers. Written at most every PUBLISH_PERIOD seconds and only when
something changed (an idle cluster of 100 nodes writes nothing; a busy one at
most 100 / PUBLISH_PERIOD writes per second), and at once on request: a reader
that wants fresh figures puts REQUESTS/<node> and waits for the record that
answers it (collect()).
"""

from __future__ import annotations

import json
import time

NODE_ANNOTATIONS = ("flannel.alpha.coreos.com/backend-type", "flannel.alpha.coreos.com/backend-data",
                    "flannel.alpha.coreos.com/public-ip", "flannel.alpha.coreos.com/kube-subnet-manager")
DATA_PATH_ANNOTATION = "netemu.io/data-path"
STATS = "/netemu.io/overlay/stats/"
REQUESTS = "/netemu.io/overlay/stats-requests/"
PUBLISH_PERIOD = 5.0
COLLECT_TIMEOUT = 2.0


def node_annotations(backend_type: str, backend_data: dict | None, public_ip: str, data_path: str) -> dict:
    """The annotations a node's overlay daemon puts on its Node (flannel's
    values: backend-data is JSON, "null" for a backend without data)."""
    return {"flannel.alpha.coreos.com/backend-type": backend_type,
            "flannel.alpha.coreos.com/backend-data": json.dumps(backend_data or None, separators=(",", ":")),
            "flannel.alpha.coreos.com/public-ip": str(public_ip),
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            DATA_PATH_ANNOTATION: data_path}


def stats_key(node: str) -> str:
    return STATS + node


def request_key(node: str) -> str:
    return REQUESTS + node


def read(store, node: str) -> dict | None:
    """NODE's last published record, or None."""
    kv = store.get(stats_key(node))
    return kv.value if kv is not None and isinstance(kv.value, dict) else None


def request(store, node: str) -> int:
    """Ask NODE's daemon for a record now; the revision its answer carries
    (record["answers"] >= it)."""
    return store.put(request_key(node), {"at": time.time()})


def collect(store, nodes: list[str], timeout: float = COLLECT_TIMEOUT) -> dict[str, dict | None]:
    """Fresh records of NODES (without their "answers" bookkeeping): ask each
    daemon, wait up to TIMEOUT for their answers; a daemon that does not answer
    (down, restarting) is shown by the last record it published."""
    asked = {node: request(store, node) for node in nodes}
    deadline = time.monotonic() + timeout
    result: dict[str, dict | None] = {}
    while True:
        result = {node: read(store, node) for node in nodes}
        waiting = [n for n in nodes if not result[n] or int(result[n].get("answers") or 0) < asked[n]]
        if not waiting or time.monotonic() >= deadline:
            return {node: {k: v for k, v in r.items() if k != "answers"} if r else None
                    for node, r in result.items()}
        time.sleep(0.02)


def worth_publishing(record: dict, last: dict | None, last_at: float, now: float, requested: bool) -> bool:
    """Publish RECORD? On request always; otherwise when it differs from the
    LAST one published and PUBLISH_PERIOD has passed since (pure)."""
    if requested or last is None:
        return True
    return record != last and now - last_at >= PUBLISH_PERIOD
