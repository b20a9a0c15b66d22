"""Random and mutated requests against the API server's routes: whatever comes
in, the answer is a well-formed response (a Status for every error), never an
internal error, and no half-written object remains."""

from __future__ import annotations

import json
import os
import random
import urllib.parse

import trio

from netemu.apiserver import http
from netemu.apiserver.server import ApiServer, ensure_system_namespaces
from netemu.store import registry
from netemu.store.sqlite import SqliteStore

SEED_OBJECTS = [
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "nginx"}},
     "spec": {"containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 80}]}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"},
     "spec": {"selector": {"app": "nginx"}, "ports": [{"port": 80}], "type": "NodePort"}},
    {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "rc"},
     "spec": {"replicas": 2, "selector": {"app": "nginx"},
              "template": {"metadata": {"labels": {"app": "nginx"}},
                           "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "dep"},
     "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
              "template": {"metadata": {"labels": {"app": "d"}},
                           "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns1"}},
]
PATHS = ["/api", "/apis", "/api/v1", "/apis/apps/v1", "/apis/extensions/v1beta1", "/version", "/openapi/v2",
         "/api/v1/pods", "/api/v1/namespaces/default/pods", "/api/v1/namespaces/default/pods/web",
         "/api/v1/namespaces/default/pods/web/log", "/api/v1/namespaces/default/services",
         "/api/v1/namespaces/default/services/svc", "/api/v1/namespaces/default/replicationcontrollers/rc/scale",
         "/apis/apps/v1/namespaces/default/deployments/dep", "/apis/apps/v1/namespaces/default/deployments/dep/scale",
         "/api/v1/nodes", "/api/v1/nodes/n1", "/api/v1/namespaces", "/api/v1/namespaces/ns1",
         "/apis/batch/v1/namespaces/default/jobs", "/apis/extensions/v1beta1/namespaces/default/jobs",
         "/apis/discovery.k8s.io/v1/endpointslices", "/api/v1/namespaces/nosuch/pods", "/apis/x/y/z"]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
CONTENT_TYPES = ["application/json", "application/merge-patch+json", "application/strategic-merge-patch+json",
                 "application/json-patch+json", "application/apply-patch+yaml", "text/plain", ""]
QUERY_KEYS = ["labelSelector", "fieldSelector", "watch", "resourceVersion", "timeoutSeconds", "container",
              "tailLines", "limitBytes", "fieldValidation", "propagationPolicy", "limit", "includeObject"]
ODD_VALUES = ["", "true", "0", "-1", "x=y", "a in (b", "!", "metadata.name=web", "spec.nodeName!=n1",
              "99999999999999999999", "Strict", "Orphan", "Foreground", "\x00", "é", "1e9", "(,)"]
ODD_JSON = [None, 0, -1, 2 ** 40, "", "x", [], {}, [1, {"a": None}], {"$patch": "delete"}, True, 1.5]


def mutate(rng: random.Random, value, depth: int = 0):
    """A random change somewhere inside VALUE."""
    if isinstance(value, dict) and value and rng.random() < 0.8 and depth < 6:
        key = rng.choice(list(value))
        out = dict(value)
        r = rng.random()
        if r < 0.15:
            del out[key]
        elif r < 0.25:
            out[rng.choice(["bogus", "$patch", "metadata", "spec", "name"])] = rng.choice(ODD_JSON)
        else:
            out[key] = mutate(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8 and depth < 6:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = mutate(rng, out[i], depth + 1)
        if rng.random() < 0.2:
            out.append(rng.choice(ODD_JSON))
        return out
    return rng.choice(ODD_JSON + ["Bad_Name", "10.96.0.5", 70000, "TCP", "LoadBalancer"])


# (method, path, seed object index or None) that mean something: most requests
# are these, so that admission, patching and deletion are exercised, not only routing.
MEANINGFUL = [
    ("POST", "/api/v1/namespaces/default/pods", 0), ("PUT", "/api/v1/namespaces/default/pods/web", 0),
    ("PATCH", "/api/v1/namespaces/default/pods/web", 0), ("DELETE", "/api/v1/namespaces/default/pods/web", None),
    ("POST", "/api/v1/namespaces/default/services", 1), ("PUT", "/api/v1/namespaces/default/services/svc", 1),
    ("PATCH", "/api/v1/namespaces/default/services/svc", 1),
    ("DELETE", "/api/v1/namespaces/default/services/svc", None),
    ("POST", "/api/v1/namespaces/default/replicationcontrollers", 2),
    ("PATCH", "/api/v1/namespaces/default/replicationcontrollers/rc", 2),
    ("PATCH", "/api/v1/namespaces/default/replicationcontrollers/rc/scale", None),
    ("PUT", "/api/v1/namespaces/default/replicationcontrollers/rc/scale", None),
    ("POST", "/apis/apps/v1/namespaces/default/deployments", 3),
    ("PUT", "/apis/apps/v1/namespaces/default/deployments/dep", 3),
    ("PATCH", "/apis/apps/v1/namespaces/default/deployments/dep", 3),
    ("DELETE", "/apis/apps/v1/namespaces/default/deployments/dep", None),
    ("POST", "/api/v1/namespaces", 4), ("DELETE", "/api/v1/namespaces/ns1", None),
    ("GET", "/api/v1/pods", None), ("GET", "/api/v1/namespaces/default/services", None),
    ("PATCH", "/api/v1/nodes/n1", None),
]
SCALE = {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "rc"}, "spec": {"replicas": 3}}


# kubectl 1.32's `create namespace new-namespace` body (protobuf), to mutate.
NAMESPACE_PROTOBUF = (b'k8s\x00\n\x0f\n\x02v1\x12\tNamespace\x12%\n\x1d\n\rnew-namespace\x12\x00\x1a\x00"\x00'
                      b'*\x002\x008\x00B\x00\x12\x00\x1a\x02\n\x00\x1a\x00"\x00')


def request(rng: random.Random) -> http.Request:
    if rng.random() < 0.05:
        raw = bytearray(NAMESPACE_PROTOBUF)
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return http.Request("POST", "/api/v1/namespaces", {},
                            {"content-type": "application/vnd.kubernetes.protobuf"}, bytes(raw))
    if rng.random() < 0.75:
        method, path, seed = rng.choice(MEANINGFUL)
        body = SEED_OBJECTS[seed] if seed is not None else (
            SCALE if path.endswith("/scale") else {"metadata": {"labels": {"k": "v"}}})
        return _build(rng, method, path, body)
    return _build(rng, rng.choice(METHODS), rng.choice(PATHS), rng.choice(SEED_OBJECTS))


def _build(rng: random.Random, method: str, path: str, body) -> http.Request:
    if rng.random() < 0.1:
        path = path.replace("/", rng.choice(["//", "/../", "/%00/", "/x/"]), 1)
    query = {k: [rng.choice(ODD_VALUES)] for k in rng.sample(QUERY_KEYS, rng.randrange(3))}
    if query.get("watch") == ["true"]:
        query["watch"] = ["false"]                 # streams are tested elsewhere
    if rng.random() < 0.15:
        body = [{"op": rng.choice(["add", "remove", "replace", "move", "copy", "test", "nope"]),
                 "path": rng.choice(["/metadata/labels/x", "/spec", "", "/spec/replicas", "x", "/a/~1b"]),
                 "value": rng.choice(ODD_JSON), "from": "/metadata"}]
    elif rng.random() < 0.7:
        for _ in range(rng.randrange(1, 4)):
            body = mutate(rng, body)
    raw = json.dumps(body).encode()
    if rng.random() < 0.1:
        cut = rng.randrange(len(raw) + 1)
        raw = raw[:cut] + bytes([rng.randrange(256)]) + raw[cut + 1:]
    content_type = rng.choice(CONTENT_TYPES)
    if rng.random() < 0.7:                       # the type that goes with the method, mostly
        content_type = ("application/json" if method in ("POST", "PUT") else
                        rng.choice(CONTENT_TYPES[1:4]) if isinstance(body, dict) else CONTENT_TYPES[3])
    return http.Request(method, urllib.parse.unquote(path), query,
                        {"content-type": content_type,
                         "accept": rng.choice(["application/json",
                                               "application/json;as=Table;v=v1;g=meta.k8s.io"])}, raw)


def test_ten_thousand_random_requests_never_crash_the_server(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    registry.create(store, {"kind": "Node", "metadata": {"name": "n1"}, "spec": {}, "status": {}})
    ensure_system_namespaces(store)
    server = ApiServer(store, pod_dir=lambda ns, pod: str(tmp_path / ns / pod))
    rng = random.Random(int(os.environ.get("NETEMU_FUZZ_SEED", "1234")))
    codes: dict[int, int] = {}

    async def main():
        for obj in SEED_OBJECTS:
            gv = obj["apiVersion"]
            base = "/api/v1" if gv == "v1" else f"/apis/{gv}"
            res = {"Pod": "pods", "Service": "services", "ReplicationController": "replicationcontrollers",
                   "Deployment": "deployments", "Namespace": "namespaces"}[obj["kind"]]
            path = f"{base}/{res}" if obj["kind"] == "Namespace" else f"{base}/namespaces/default/{res}"
            await server.handle(http.Request("POST", path, {}, {}, json.dumps(obj).encode()))
        for i in range(10_000):
            req = request(rng)
            resp = await server.handle(req)
            codes[resp.status] = codes.get(resp.status, 0) + 1
            assert resp.status < 500, (req, resp.body)
            if resp.status >= 400 and isinstance(resp.body, bytes):
                status = json.loads(resp.body)
                assert status["kind"] == "Status" and status["code"] == resp.status, status
                assert status["message"] and "\n" not in status["message"], status

    trio.run(main)
    assert codes.get(200, 0) > 100 and sum(v for k, v in codes.items() if k >= 400) > 1000, codes
    # Every object left in the store is one the server admits (nothing half-written):
    for kind in ("Pod", "Service", "ReplicationController", "Deployment"):
        for obj in registry.list_(store, kind):
            assert obj["metadata"].get("uid") and obj["metadata"]["name"]
    store.close()
