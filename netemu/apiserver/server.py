"""The API server's routes: Kubernetes REST over the store and admission.

    /api, /apis, /apis/<group>, /api/v1, /apis/<group>/<version>   discovery
    /version, /healthz, /livez, /readyz, /openapi/v2               server
    <gv>/[namespaces/<ns>/]<resource>[/<name>[/scale]]             objects
    /api/v1/namespaces/<ns>/pods/<name>/log                        logs
    /api/v1/namespaces/<ns>/pods/<name>/exec|attach|portforward    streams (podstream.py)

Every write goes through netemu.api (admission: defaults, validation, cluster IP
and node port allocation), the path netemu's own CLI takes; every read is the
store's, with metadata.resourceVersion the store's revision. What is not served
answers 404 or 405 as kube-apiserver does, never a made-up success.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time
import urllib.parse

import trio
import yaml

from netemu import api, names
from netemu.apiserver import discovery, dryrun, paging, podstream, status, tables
from netemu.apiserver.http import Request, Response
from netemu.k8s import jsonpatch, kinds, managedfields, protobuf, selectors, strategicpatch
from netemu.node import logstamps
from netemu.store import registry
from netemu.store.base import Compacted, Conflict
from netemu.topology import manifests, schema
from netemu.topology.model import TopologyError

log = logging.getLogger("netemu.apiserver")

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"      # server-side apply (managedfields.py)
PATCHES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_PATCH, APPLY_PATCH)
_WRITES = ("POST", "PUT", "PATCH", "DELETE")
INT64_MAX = 2 ** 63 - 1
# Kinds whose DELETE answers with the object deleted, not a Status, as their
# kube-apiserver registries do (ReturnDeletedObject): the Python client decodes
# the answer to delete_namespaced_pod as a Pod.
_RETURN_DELETED = ("Pod", "Service")
# kubectl's watch keeps a connection this long unless it says otherwise
# (kube-apiserver's --min-request-timeout: 1800 s).
DEFAULT_WATCH_TIMEOUT = 1800.0
# A watch that asked for bookmarks (allowWatchBookmarks) gets one this often:
# the revision it is up to, so a client that restarts it need not re-list.
BOOKMARK_INTERVAL = 60.0
STREAMS = ("exec", "attach", "portforward")
FOLLOW_POLL = 0.2               # seconds between looks at a followed log that has not grown
# The loader's warning about a field its schema does not know (manifests._decode_struct).
_UNKNOWN_FIELD = re.compile(r": ([^\s:]+): unknown field \(")


def _json(code: int, body) -> Response:
    return Response(code, json.dumps(body, separators=(",", ":")).encode())


class Target:
    """A parsed object path: which kind, under which group/version, where."""

    def __init__(self, gv: str, kind: kinds.Kind, namespace: str | None, name: str | None,
                 subresource: str | None):
        self.gv, self.kind, self.namespace, self.name, self.subresource = gv, kind, namespace, name, subresource

    @property
    def group(self) -> str:
        return self.gv.split("/")[0] if "/" in self.gv else ""

    @property
    def qualified(self) -> str:
        return self.kind.qualified(self.group)


def parse_path(path: str) -> tuple[str, object] | None:
    """A request path -> ("discovery", doc) | ("object", Target) | None (not served)."""
    parts = [p for p in path.split("/") if p]
    if parts == ["api"]:
        return "api", None
    if parts == ["apis"]:
        return "apis", None
    if len(parts) == 2 and parts[0] == "apis":
        doc = discovery.api_group(parts[1])
        return ("discovery", doc) if doc else None
    if parts[:1] == ["api"] and len(parts) >= 2:
        gv, rest = parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    if not rest:
        doc = discovery.resource_list(gv)
        return ("discovery", doc) if doc else None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    kind = kinds.lookup(gv, rest[0])
    if kind is None or len(rest) > 3 or (namespace is not None and not kind.namespaced):
        return None
    if kind.namespaced and namespace is None and len(rest) > 1:
        return None                     # a namespaced object is only ever under its namespace
    name = rest[1] if len(rest) >= 2 else None
    sub = rest[2] if len(rest) == 3 else None
    if sub is not None and not (sub == "scale" and kind.scale_field or
                                sub == "status" and kind.kind in kinds.WITH_STATUS or
                                sub in ("log", *STREAMS) and kind.kind == "Pod"):
        return None
    return "object", Target(gv, kind, namespace, name, sub)


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out



# What a status written through /status may hold, by field, wherever it is in
# the status (every reader of netemu's, printers and controllers, relies on these
# shapes): strings, counters, lists of objects.
_STATUS_STRINGS = frozenset("phase podIP hostIP reason message nominatedNodeName qosClass startTime "
                            "completionTime type status lastTransitionTime lastUpdateTime lastProbeTime "
                            "ip hostname name image imageID containerID".split())
_STATUS_COUNTS = frozenset("replicas readyReplicas availableReplicas updatedReplicas unavailableReplicas "
                           "fullyLabeledReplicas observedGeneration active succeeded failed ready terminating "
                           "currentNumberScheduled numberMisscheduled desiredNumberScheduled numberReady "
                           "updatedNumberScheduled numberAvailable numberUnavailable collisionCount "
                           "restartCount".split())
_STATUS_LISTS = frozenset("conditions containerStatuses initContainerStatuses podIPs hostIPs addresses "
                          "ingress ports".split())


def _status_problem(value, path: str = "status") -> str | None:
    """Why VALUE cannot be stored as an object's status, or None."""
    if not isinstance(value, dict):
        return f"{path}: Invalid value: must be an object"
    for key, item in value.items():
        where = f"{path}.{key}"
        if item is None:
            continue
        if key in _STATUS_STRINGS and not isinstance(item, str):
            return f"{where}: Invalid value: {json.dumps(item)[:60]}: must be a string"
        if key in _STATUS_COUNTS and (isinstance(item, bool) or not isinstance(item, int) or item < 0):
            return f"{where}: Invalid value: {json.dumps(item)[:60]}: must be a non-negative integer"
        if key in _STATUS_LISTS:
            if not isinstance(item, list):
                return f"{where}: Invalid value: must be a list"
            for i, element in enumerate(item):
                problem = _status_problem(element, f"{where}[{i}]")
                if problem:
                    return problem
        elif isinstance(item, dict):
            problem = _status_problem(item, where)
            if problem:
                return problem
    return None


def _json_body(req: Request):
    """The request's body as JSON (any value; callers check its shape)."""
    try:
        return json.loads(req.body or b"null")
    except (ValueError, UnicodeDecodeError) as err:
        raise api.ApiError(f"the body of the request could not be decoded as JSON: {err}",
                           reason="BadRequest") from None

class _LogLines:
    """A log's bytes on their way out: as they are, or (timestamps, since)
    line by line with the time each was written (node/logstamps.py). Lines
    are sent whole; a line still being written waits for its newline, unless
    the log is final."""

    def __init__(self, times_path: str, timestamps: bool, since: int | None):
        self.timestamps, self.since = timestamps, since
        self.stamps = logstamps.StampFile(times_path) if timestamps or since is not None else None
        self.pending = b""

    def feed(self, data: bytes, offset: int, final: bool = False) -> bytes:
        """DATA, read at byte OFFSET of the log, as it is to be sent."""
        if self.stamps is None:
            return data
        buf, start = self.pending + data, offset - len(self.pending)
        cut = len(buf) if final else buf.rfind(b"\n") + 1
        buf, self.pending = buf[:cut], buf[cut:]
        out = []
        now = time.time_ns()
        timed = logstamps.line_times(buf, start, self.stamps.refresh(), now)
        for line, ns in timed:
            if self.since is not None and ns < self.since:
                continue
            out.append(logstamps.rfc3339nano(ns).encode() + b" " + line if self.timestamps else line)
        if timed and timed[-1][1] == now:
            self.stamps.observe(start + len(buf), now)      # the time shown stays the line's
        return b"".join(out)


class ApiServer:
    def __init__(self, store, settings=None, address: str = "127.0.0.1:8080", pod_dir=None,
                 cluster: str | None = None):
        """POD_DIR(namespace, pod): a pod's folder (its container logs, its
        sandbox; the kubelet's); None: pods/log and pods/exec are not served."""
        self.store, self.settings, self.address, self.pod_dir = store, settings, address, pod_dir
        self.cluster = cluster

    # -- dispatch ---------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        if path in ("/healthz", "/livez", "/readyz"):
            return Response(200, b"ok", "text/plain; charset=utf-8")
        if path == "/version":
            return _json(200, discovery.VERSION) if req.method == "GET" else status.method_not_allowed()
        if path == "/openapi/v2":
            # An empty protobuf document: kubectl's create/apply accept it and
            # validate nothing client-side; the server validates (KUBE-API.md).
            return Response(200, b"", "application/octet-stream")
        route = parse_path(path)
        if route is None:
            return status.no_route()
        what, arg = route
        if what != "object":
            if req.method != "GET":
                return status.method_not_allowed()
            if what in ("api", "apis"):
                version = discovery.wants_aggregated(req.headers.get("accept"))
                if version:
                    resp = _json(200, discovery.aggregated(what, version))
                    resp.content_type = discovery.aggregated_content_type(version)
                    resp.headers.append(("Vary", "Accept"))
                    return resp
            doc = {"api": lambda: discovery.api_versions(self.address),
                   "apis": discovery.api_group_list}.get(what)
            return _json(200, doc() if doc else arg)
        t: Target = arg
        if t.kind.read_only and (req.method != "GET" or t.subresource):
            return status.method_not_allowed()
        if req.method in _WRITES:
            dry = self._dry_run_values(req)
            if isinstance(dry, Response):
                return dry
            if dry:
                return await self._dry_run(req, t)
        return await self._object(req, t)

    async def _object(self, req: Request, t: Target) -> Response:
        """A request for an object, a list of them, or a subresource."""
        try:
            if t.subresource == "scale":
                return await self._scale(req, t)
            if t.subresource == "status":
                return self._status(req, t)
            if t.subresource == "log":
                return await self._log_anywhere(req, t)
            if t.subresource in STREAMS:
                return await self._stream(req, t)
            if req.method == "GET" and t.name is None:
                return await self._list_or_watch(req, t)
            if req.method == "GET":
                return self._get(req, t)
            if req.method == "POST" and t.name is None and (t.namespace or not t.kind.namespaced):
                return self._create(req, t)
            if req.method == "PUT" and t.name is not None:
                return self._replace(req, t)
            if req.method == "PATCH" and t.name is not None:
                return self._patch(req, t)
            if req.method == "DELETE" and t.name is not None:
                return self._delete(req, t)
            if req.method == "DELETE" and t.name is None and t.kind.kind not in kinds.NO_DELETE_COLLECTION \
                    and (t.namespace or not t.kind.namespaced) and t.subresource is None:
                return self._delete_collection(req, t)
            return status.method_not_allowed()
        except selectors.SelectorError as err:
            return status.bad_request(str(err))
        except api.ApiError as err:
            return self._api_error(err, t)

    # -- ?dryRun=All (dryrun.py) ---------------------------------------------------

    def _dry_run_values(self, req: Request) -> list[str] | Response:
        """The request's dryRun values: ?dryRun=, or a DELETE's DeleteOptions
        (kubectl puts them in the body); a Status when they are not served."""
        values = list(req.query.get("dryRun") or [])
        if req.method == "DELETE" and req.body.strip():
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                options = json.loads(req.body)
                if isinstance(options, dict) and isinstance(options.get("dryRun"), list):
                    values += [v for v in options["dryRun"] if isinstance(v, str)]
        values = [v for v in values if v]
        problem = dryrun.problem(values)
        if problem:
            options = {"POST": "CreateOptions", "PUT": "UpdateOptions", "PATCH": "PatchOptions",
                       "DELETE": "DeleteOptions"}[req.method]
            return status.error("Invalid", f'{options}.meta.k8s.io "" is invalid: {problem}')
        return values

    async def _dry_run(self, req: Request, t: Target) -> Response:
        """The request served over a store that keeps no write (dryrun.py); the
        answer shows the objects as they would be, with the resourceVersion
        they still have (none for one that would be new)."""
        scratch = dryrun.DryRunStore(self.store)
        twin = copy.copy(self)
        twin.store = scratch
        resp = await twin._object(req, t)
        if not isinstance(resp.body, bytes) or not resp.content_type.startswith(JSON) or resp.status >= 300:
            return resp
        body = json.loads(resp.body)
        items = body.get("items") if isinstance(body.get("items"), list) else [body]
        for obj in items:
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            if not isinstance(meta, dict) or obj.get("kind") == "Status" or "name" not in meta:
                continue
            version = scratch.stored_version(registry.key(t.kind.kind, meta.get("namespace"), meta["name"]))
            if version is None:
                meta.pop("resourceVersion", None)
            else:
                meta["resourceVersion"] = version
        return Response(resp.status, json.dumps(body, separators=(",", ":")).encode(), resp.content_type,
                        resp.headers)

    def _api_error(self, err: api.ApiError, t: Target) -> Response:
        message = str(err)
        # api.py names a resource with the group it is stored in (jobs.batch);
        # the client may have asked under another (daemonsets.extensions).
        stored = t.kind.qualified()
        if message.startswith(stored + ' "'):
            message = t.qualified + message[len(stored):]
        reason = err.reason if err.reason in status.CODES else "Invalid"
        return status.error(reason, message, {"name": t.name or "", "kind": t.kind.resource})

    # -- reads ------------------------------------------------------------------

    def _present(self, obj: dict, t: Target) -> dict:
        """OBJ as the client's group/version shows it (extensions/v1beta1 or the stored one)."""
        obj["apiVersion"] = t.gv
        return obj

    def _read(self, t: Target) -> dict | None:
        return registry.get(self.store, t.kind.kind, t.namespace if t.kind.namespaced else None, t.name)

    def _pod_of_subresource(self, t: Target) -> dict | Response:
        """The pod a log or exec request is for, or the answer when there is none
        (a server without pod folders serves neither subresource)."""
        if self.pod_dir is None:
            return status.no_route()
        pod = self._read(t)
        if pod is None:
            return status.not_found(t.qualified, t.name, t.group)
        return pod

    def _get(self, req: Request, t: Target) -> Response:
        obj = self._read(t)
        if obj is None:
            return status.not_found(t.qualified, t.name, t.group)
        obj = self._present(obj, t)
        version = tables.wants_table(req.headers.get("accept"))
        if version:
            return _json(200, tables.table(t.kind.kind, [obj], obj["metadata"]["resourceVersion"], version,
                                           req.arg("includeObject", "Metadata")))
        return _json(200, obj)

    def _filters(self, req: Request, t: Target):
        labels = selectors.parse_label_selector(req.arg("labelSelector"))
        fields = selectors.parse_field_selector(req.arg("fieldSelector"), t.kind.fields)

        def keep(obj: dict) -> bool:
            meta = obj.get("metadata") or {}
            if t.namespace and t.kind.namespaced and meta.get("namespace", "default") != t.namespace:
                return False
            return selectors.labels_match(labels, meta.get("labels")) and selectors.fields_match(fields, obj)

        return keep

    async def _list_or_watch(self, req: Request, t: Target) -> Response:
        keep = self._filters(req, t)
        if req.arg("watch") in ("true", "1"):
            return self._watch(req, t, keep)
        paged = self._page(req, t, keep)
        if isinstance(paged, Response):
            return paged
        rev, objs, token, remaining = paged
        objs = [self._present(o, t) for o in objs]
        meta = {"resourceVersion": str(rev)}
        if token:
            meta["continue"] = token
        if remaining is not None:
            meta["remainingItemCount"] = remaining
        version = tables.wants_table(req.headers.get("accept"))
        if version:
            table = tables.table(t.kind.kind, objs, str(rev), version, req.arg("includeObject", "Metadata"))
            table["metadata"] = meta
            return _json(200, table)
        return _json(200, {"kind": f"{t.kind.kind}List", "apiVersion": t.gv, "metadata": meta, "items": objs})

    def _page(self, req: Request, t: Target, keep) -> tuple[int, list[dict], str | None, int | None] | Response:
        """(revision, objects, continue token or None, remainingItemCount or
        None) of the list asked for: whole, or one page of it (?limit=,
        ?continue=: paging.py). The count is there when more follow and the
        list is not filtered, as kube-apiserver sets it."""
        prefix = registry.prefix(t.kind.kind, t.namespace if t.kind.namespaced else None)
        try:
            limit = paging.parse_limit(req.arg("limit"))
            token = req.arg("continue")
            if token:
                if req.arg("resourceVersion") not in (None, "", "0"):
                    return status.bad_request("specifying resource version is not allowed when using continue")
                rev, after = paging.decode_token(token, prefix)
            else:
                rev, after = self.store.revision(), ""
        except paging.PagingError as err:
            return status.bad_request(str(err))
        if limit is None and not token:
            # The revision is read before the objects: a write in between shows in
            # the list and again in a watch from that revision (harmless), while
            # the other order could lose it.
            return rev, [o for o in registry.list_(self.store, t.kind.kind, t.namespace) if keep(o)], None, None
        try:
            objs, last = paging.page(self.store, prefix, rev, after, limit or paging.MAX_LIMIT, keep)
            filtered = bool(req.arg("labelSelector") or req.arg("fieldSelector"))
            remaining = self.store.count_at(prefix, rev, last) if last and not filtered else None
        except Compacted:
            return status.error("Expired", paging.TOO_OLD)
        return rev, objs, (paging.encode_token(rev, last, prefix) if last else None), remaining

    def _watch(self, req: Request, t: Target, keep) -> Response:
        version = tables.wants_table(req.headers.get("accept"))
        include = req.arg("includeObject", "Metadata")
        prefix = registry.prefix(t.kind.kind, t.namespace if t.kind.namespaced else None)
        since_arg = req.arg("resourceVersion") or ""
        try:
            timeout = float(req.arg("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        except ValueError:
            return status.bad_request(f"invalid timeoutSeconds: {req.arg('timeoutSeconds')!r}")
        if since_arg and not since_arg.isdigit():
            return status.bad_request(f'invalid resource version "{since_arg}"')
        store = self.store
        first_table = True

        def encode(type_: str, obj: dict) -> bytes:
            nonlocal first_table
            if version and type_ != "ERROR":
                obj = tables.table(t.kind.kind, [obj], obj["metadata"]["resourceVersion"], version,
                                   include, columns=first_table)
                first_table = False
            return json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"

        bookmarks = req.arg("allowWatchBookmarks") in ("true", "1") and not version

        async def events(write) -> None:
            since = int(since_arg) if since_arg else 0
            # Every change up to this revision has been sent (or filtered out):
            # what a bookmark may promise.
            seen = {"revision": since}
            lock = trio.Lock()              # the events and the bookmarks share one stream

            async def send(type_: str, obj: dict) -> None:
                async with lock:
                    await write(encode(type_, obj))

            async def bookmark_every(interval: float) -> None:
                while True:
                    await trio.sleep(interval)
                    await send("BOOKMARK", {"kind": t.kind.kind, "apiVersion": t.gv,
                                            "metadata": {"resourceVersion": str(seen["revision"])}})

            with trio.move_on_after(timeout):
                if since == 0:
                    # No revision (or "0", any): the current state first, as ADDED events.
                    since = seen["revision"] = store.revision()
                    for obj in registry.list_(store, t.kind.kind, t.namespace if t.kind.namespaced else None):
                        if keep(obj):
                            await send("ADDED", self._present(obj, t))
                else:
                    try:
                        store.events_since(since, prefix)
                    except Compacted:
                        current = store.revision()
                        await send("ERROR", status.status(
                            "Expired", f"too old resource version: {since} ({current})"))
                        return
                last: dict[str, str] = {}
                async with trio.open_nursery() as nursery:
                    if bookmarks:
                        nursery.start_soon(bookmark_every, BOOKMARK_INTERVAL)
                    async with contextlib.aclosing(store.watch(prefix, since)) as changes:
                        async for ev in changes:
                            type_ = self._event_type(ev, last)      # every event: keeps `last` whole
                            seen["revision"] = ev.revision
                            obj = copy.deepcopy(ev.value)
                            obj.setdefault("metadata", {})["resourceVersion"] = str(ev.revision)
                            if not keep(obj):
                                continue
                            await send(type_, self._present(obj, t))

        return Response(200, events, JSON)

    def _event_type(self, ev, last: dict[str, str]) -> str:
        """ADDED, MODIFIED or DELETED for a store event. LAST: the previous
        event type per key in this stream (spares a store query)."""
        previous = last.get(ev.key)
        last[ev.key] = ev.type
        if ev.type == "DELETE":
            return "DELETED"
        if previous is not None:
            return "MODIFIED" if previous == "PUT" else "ADDED"
        existed = self.store.existed_before(ev.key, ev.revision)
        if existed is None:
            # History compacted: the key's current incarnation still tells,
            # created at this very revision or not.
            kv = self.store.get(ev.key)
            existed = not (kv is not None and kv.create_revision == ev.revision)
        return "MODIFIED" if existed else "ADDED"

    # -- writes -----------------------------------------------------------------

    def _body(self, req: Request) -> dict:
        media = (req.headers.get("content-type") or "application/json").split(";")[0].strip()
        if media == protobuf.MEDIA_TYPE:
            try:
                return protobuf.decode_object(req.body)
            except protobuf.DecodeError as err:
                unsupported = "not decoded by netemu" in str(err)
                raise api.ApiError(f"the body of the request could not be decoded as protobuf: {err}",
                                   reason="UnsupportedMediaType" if unsupported else "BadRequest") from None
        if media not in ("application/json", "*/*", ""):
            # YAML and CBOR bodies are not decoded here; a real server that
            # lacks a codec answers the same.
            raise api.ApiError(f'the body of the request was in an unknown format - accepted media types '
                               f'include: application/json, {protobuf.MEDIA_TYPE}', reason="UnsupportedMediaType")
        body = _json_body(req)
        if not isinstance(body, dict):
            raise api.ApiError("the body of the request must be a JSON object", reason="BadRequest")
        return body

    def _check_body(self, body: dict, t: Target) -> dict:
        """The object in BODY as this URL may write it: its kind, version and
        namespace must be the URL's (the API server's checks), then it is
        stored in its current version (admission converts the old ones)."""
        kind, version = body.get("kind"), body.get("apiVersion")
        if kind is not None and kind != t.kind.kind or version is not None and version != t.gv:
            raise api.ApiError(f"the API version in the data ({version}) does not match the expected "
                               f"API version ({t.gv})" if kind == t.kind.kind else
                               f"{kind} in version \"{version}\" cannot be handled as a {t.kind.kind}",
                               reason="BadRequest")
        body = dict(body, kind=t.kind.kind, apiVersion=t.gv)
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise api.ApiError(f"{t.kind.kind} in version \"{t.gv}\" cannot be handled as a "
                               f"{t.kind.kind}: metadata must be an object", reason="BadRequest")
        if t.kind.namespaced:
            ns = meta.get("namespace")
            if ns and ns != t.namespace:
                raise api.ApiError("the namespace of the provided object does not match the namespace "
                                   "sent on the request", reason="BadRequest")
            meta["namespace"] = t.namespace or "default"
        if t.name is not None and meta.get("name") not in (None, t.name):
            raise api.ApiError("the name of the object "
                               f"({meta.get('name')}) does not match the name on the URL ({t.name})",
                               reason="BadRequest")
        if t.name is not None:
            meta["name"] = t.name
        return body

    def _validate_fields(self, req: Request, obj: dict, t: Target) -> list[str]:
        """?fieldValidation=: Strict refuses unknown fields (400), Warn (the
        default) answers with a Warning header per field, Ignore drops them
        silently. Admission drops them in every case."""
        mode = req.arg("fieldValidation") or "Warn"
        if mode not in ("Strict", "Warn", "Ignore"):
            raise api.ApiError(f'fieldValidation: Unsupported value: "{mode}": supported values: '
                               '"Ignore", "Strict", "Warn"', reason="BadRequest")
        if mode == "Ignore" or t.kind.kind not in schema.SPEC_STRUCTS:
            return []
        try:
            _, warnings = manifests.normalize_object(obj, "", "")
        except TopologyError:
            return []                       # admission reports it, with the API's wording
        unknown = [m[1] for w in warnings if (m := _UNKNOWN_FIELD.search(w))]
        if unknown and mode == "Strict":
            raise api.ApiError(f'{t.kind.kind} in version "{t.gv}" cannot be handled as a {t.kind.kind}: '
                               "strict decoding error: " + ", ".join(f'unknown field "{f}"' for f in unknown),
                               reason="BadRequest")
        return [f'299 - "unknown field \\"{f}\\""' for f in unknown]

    def _namespace_open(self, t: Target) -> None:
        """New objects go only into a namespace that exists and is not terminating."""
        if not t.kind.namespaced:
            return
        ns = registry.get(self.store, "Namespace", None, t.namespace or "default")
        if ns is None:
            raise api.ApiError(f'namespaces "{t.namespace}" not found', reason="NotFound")
        if ns["metadata"].get("deletionTimestamp"):
            raise api.ApiError(f"{t.kind.resource} is forbidden: unable to create new content in namespace "
                               f"{t.namespace} because it is being terminated", reason="Forbidden")

    def _create(self, req: Request, t: Target) -> Response:
        self._namespace_open(t)
        obj = self._check_body(self._body(req), t)
        warnings = self._validate_fields(req, obj, t)
        stored = api.create(self.store, obj, self.settings, managed=self._tracker(req, t))
        resp = _json(201, self._present(stored, t))
        resp.headers += [("Warning", w) for w in warnings]
        return resp

    def _replace(self, req: Request, t: Target) -> Response:
        obj = self._check_body(self._body(req), t)
        if self._read(t) is None:
            return status.not_found(t.qualified, t.name, t.group)
        warnings = self._validate_fields(req, obj, t)
        stored, _ = api.update(self.store, obj, self.settings,
                               managed=self._tracker(req, t, given=obj["metadata"].get("managedFields")))
        resp = _json(200, self._present(stored, t))
        resp.headers += [("Warning", w) for w in warnings]
        return resp

    def _patched(self, req: Request, current: dict, kind: str):
        """CURRENT with the request's patch applied, by its Content-Type."""
        media = (req.headers.get("content-type") or "").split(";")[0].strip()
        if media == APPLY_PATCH:
            raise api.ApiError(f"server-side apply of {kind} is not served here; use a merge patch",
                               reason="UnsupportedMediaType")
        if media not in PATCHES:
            raise api.ApiError("the body of the request was in an unknown format - accepted media types "
                               f"include: {', '.join(PATCHES)}", reason="UnsupportedMediaType")
        body = _json_body(req)
        try:
            if media == JSON_PATCH:
                return jsonpatch.apply(current, body)
            if not isinstance(body, dict):
                raise api.ApiError("the body of the request must be a JSON object", reason="BadRequest")
            if media == STRATEGIC_PATCH:
                return strategicpatch.apply(current, body, kind)
            return merge_patch(current, body)
        except (jsonpatch.PatchError, strategicpatch.PatchError) as err:
            raise api.ApiError(str(err), reason="Invalid" if media == JSON_PATCH else "BadRequest") from None

    def _patch(self, req: Request, t: Target) -> Response:
        if (req.headers.get("content-type") or "").split(";")[0].strip() == APPLY_PATCH:
            return self._apply(req, t)
        if req.arg("force") is not None:
            return status.error("Invalid", 'PatchOptions.meta.k8s.io "" is invalid: force: Forbidden: may '
                                "not be specified for non-apply patch")
        for _ in range(5):
            current = self._read(t)
            if current is None:
                return status.not_found(t.qualified, t.name, t.group)
            patched = self._patched(req, self._present(copy.deepcopy(current), t), t.kind.kind)
            if not isinstance(patched, dict):
                raise api.ApiError("the patch must leave an object", reason="BadRequest")
            patched = self._check_body(patched, t)
            pinned = patched["metadata"].get("resourceVersion") not in (
                None, current["metadata"]["resourceVersion"])
            # The patch applies to what was read; a write in between is a
            # conflict, retried on the new object as the API server retries
            # (unless the patch itself names a resourceVersion).
            if not pinned:
                patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            warnings = self._validate_fields(req, patched, t)
            given = patched["metadata"].get("managedFields")
            if given == current["metadata"].get("managedFields"):
                given = None                   # not touched by the patch
            try:
                stored, _ = api.update(self.store, patched, self.settings,
                                       managed=self._tracker(req, t, given=given))
            except api.ApiError as err:
                if err.reason == "Conflict" and not pinned:
                    continue
                raise
            resp = _json(200, self._present(stored, t))
            resp.headers += [("Warning", w) for w in warnings]
            return resp
        raise api.ApiError(f'Operation cannot be fulfilled on {t.kind.resource} "{t.name}": too many '
                           "concurrent changes", reason="Conflict")

    # -- /status ------------------------------------------------------------------

    def _status(self, req: Request, t: Target) -> Response:
        """GET, PUT or PATCH on OBJECT/status: the whole object; a write takes
        only its status, as kube-apiserver's status strategies reset the rest
        (spec, labels, annotations) to what is stored."""
        if req.method == "GET":
            return self._get(req, t)
        if req.method not in ("PUT", "PATCH"):
            return status.method_not_allowed()
        for _ in range(5):
            current = self._read(t)
            if current is None:
                return status.not_found(t.qualified, t.name, t.group)
            if req.method == "PUT":
                body = self._check_body(self._body(req), t)
            else:
                body = self._patched(req, self._present(copy.deepcopy(current), t), t.kind.kind)
                if not isinstance(body, dict):
                    raise api.ApiError("the patch must leave an object", reason="BadRequest")
            new_status = body.get("status", {})
            problem = _status_problem(new_status)
            if problem:
                raise api.ApiError(f'{t.kind.kind} "{t.name}" is invalid: {problem}')
            want = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body.get("metadata"), dict) \
                else None
            rv = current["metadata"]["resourceVersion"]
            if req.method == "PUT" and want and str(want) != rv:
                return status.error("Conflict", f'Operation cannot be fulfilled on {t.qualified} "{t.name}": '
                                    "the object has been modified; please apply your changes to the latest "
                                    "version and try again")
            if new_status == current.get("status", {}):
                return _json(200, self._present(current, t))
            changed = copy.deepcopy(current)
            changed["status"] = new_status
            try:
                stored = registry.update(self.store, changed)
            except Conflict:
                if req.method == "PUT" and want:
                    raise api.ApiError(f'Operation cannot be fulfilled on {t.qualified} "{t.name}": the object '
                                       "has been modified", reason="Conflict") from None
                continue                       # changed meanwhile: again on the new object
            return _json(200, self._present(stored, t))
        raise api.ApiError(f'Operation cannot be fulfilled on {t.kind.resource} "{t.name}": too many '
                           "concurrent changes", reason="Conflict")

    # -- field managers and server-side apply (netemu/k8s/managedfields.py) --------

    @staticmethod
    def _manager(req: Request) -> str:
        """?fieldManager=, else the User-Agent's first word, as kube-apiserver
        names a writer that does not say (kubectl/v1.33.0 ... -> "kubectl")."""
        given = req.arg("fieldManager")
        if given:
            return given
        return (req.headers.get("user-agent") or "").split("/", 1)[0][:128]

    def _tracker(self, req: Request, t: Target, subresource: str = "", given=None):
        """The managedFields of an update by this request's manager (api.create
        and api.update call it with the stored and the new object). GIVEN: the
        managedFields the request itself wrote (kubectl's client-side apply
        upgrade does), taken as the record before this update."""
        manager, kind = self._manager(req), t.kind.kind
        problem = managedfields.entries_problem(given) if given is not None else None
        if problem:
            raise api.ApiError(f'{kind} "{t.name or ""}" is invalid: {problem}')

        def managed(old, new):
            return managedfields.record_update(old, new, kind, manager, t.gv, registry.now(), subresource,
                                               entries=given)
        return managed

    def _apply(self, req: Request, t: Target) -> Response:
        """PATCH with application/apply-patch+yaml: server-side apply."""
        manager = req.arg("fieldManager")
        if not manager:
            return status.error("Invalid", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required '
                                "value: is required for apply patch")
        force = (req.arg("force") or "false").lower()
        if force not in ("true", "false"):
            return status.bad_request(f'invalid force "{force}": must be true or false')
        try:
            body = yaml.load(req.body or b"", Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as err:
            raise api.ApiError(f"error decoding YAML: {status.one_line(str(err))}", reason="BadRequest") from None
        if not isinstance(body, dict):
            raise api.ApiError("the body of the request must be an object", reason="BadRequest")
        for field in ("apiVersion", "kind"):
            if not body.get(field):
                raise api.ApiError(f"{field} must be set", reason="BadRequest")
        applied = self._check_body(body, t)
        applied["metadata"].pop("resourceVersion", None)
        warnings = self._validate_fields(req, applied, t)
        for _ in range(5):
            current = self._read(t)
            live = self._present(copy.deepcopy(current), t) if current is not None else None
            try:
                merged, entries = managedfields.apply(live, applied, t.kind.kind, manager, t.gv,
                                                      registry.now(), force=force == "true")
            except managedfields.ApplyConflict as err:
                # The message keeps its newlines (one per field), as kubectl prints it.
                body = status.status("Conflict", "", {"causes": managedfields.conflict_causes(err.conflicts)})
                body["message"] = str(err)
                return _json(409, body)
            try:
                if current is None:
                    self._namespace_open(t)
                    stored, code = api.create(self.store, merged, self.settings,
                                              managed=lambda old, new: entries), 201
                else:
                    merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    stored, _ = api.update(self.store, merged, self.settings, managed=lambda old, new: entries)
                    code = 200
            except api.ApiError as err:
                if err.reason in ("Conflict", "AlreadyExists"):
                    continue                   # changed or created meanwhile: apply again on it
                raise
            resp = _json(code, self._present(stored, t))
            resp.headers += [("Warning", w) for w in warnings]
            return resp
        raise api.ApiError(f'Operation cannot be fulfilled on {t.kind.resource} "{t.name}": too many '
                           "concurrent changes", reason="Conflict")

    def _delete_options(self, req: Request) -> dict:
        """DeleteOptions from the body and the query: propagationPolicy,
        gracePeriodSeconds, preconditions (checked; ApiError)."""
        options = self._body(req) if req.body.strip() else {}
        policy = req.arg("propagationPolicy") or options.get("propagationPolicy") or "Background"
        if policy not in ("Background", "Foreground", "Orphan"):
            raise api.ApiError(f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: '
                               f'"{policy}": supported values: "Foreground", "Background", "Orphan"')
        if options.get("orphanDependents") is True and "propagationPolicy" not in options:
            policy = "Orphan"               # the older spelling kubectl 1.20 may send
        grace = req.arg("gracePeriodSeconds")
        grace = options.get("gracePeriodSeconds") if grace is None else grace
        if grace is not None:
            try:
                grace = int(grace)
            except (TypeError, ValueError):
                raise api.ApiError(f'DeleteOptions.meta.k8s.io "" is invalid: gracePeriodSeconds: Invalid '
                                   f"value: {json.dumps(grace)}: must be an integer", reason="BadRequest") from None
            if not -1 <= grace <= INT64_MAX:
                raise api.ApiError(f'DeleteOptions.meta.k8s.io "" is invalid: gracePeriodSeconds: Invalid '
                                   f"value: {grace}: must be greater than or equal to 0")
            grace = max(grace, 0)
        preconditions = options.get("preconditions") or {}
        if not isinstance(preconditions, dict):
            raise api.ApiError("DeleteOptions: preconditions must be an object", reason="BadRequest")
        return {"policy": policy, "grace": grace, "uid": preconditions.get("uid")}

    def _delete(self, req: Request, t: Target) -> Response:
        options = self._delete_options(req)
        current = self._read(t)
        if current is None:
            return status.not_found(t.qualified, t.name, t.group)
        want_uid = options["uid"]
        if want_uid and want_uid != current["metadata"].get("uid"):
            return status.error("Conflict", f'Operation cannot be fulfilled on {t.qualified} "{t.name}": '
                                f"Precondition failed: UID in precondition: {want_uid}, UID in object meta: "
                                f"{current['metadata'].get('uid')}")
        self._delete_one(t, t.name, options)
        after = self._read(t)
        if after is not None and after["metadata"].get("uid") == current["metadata"].get("uid"):
            # Still there, terminating (a pod its kubelet is stopping): the object.
            return _json(200, self._present(after, t))
        if t.kind.kind in _RETURN_DELETED:
            return _json(200, self._present(current, t))
        return _json(200, status.success(t.name, t.group, t.kind.resource, current["metadata"].get("uid")))

    def _delete_one(self, t: Target, name: str, options: dict) -> None:
        # Background: the owner goes first, then its dependents (api.delete
        # does, as the garbage collector would). Foreground: the owner stays,
        # terminating, until they are gone. Orphan releases and keeps them.
        api.delete(self.store, t.kind.kind, t.namespace if t.kind.namespaced else None, name,
                   grace_period=options["grace"], orphan=options["policy"] == "Orphan",
                   foreground=options["policy"] == "Foreground")

    def _delete_collection(self, req: Request, t: Target) -> Response:
        """DELETE on a list (deletecollection): every object the label and
        field selectors pick, each deleted as one DELETE would; the answer is
        the list of them as they were (kube-apiserver's)."""
        keep = self._filters(req, t)
        options = self._delete_options(req)
        if options["uid"]:
            return status.bad_request("preconditions are not allowed when deleting a collection")
        rev = self.store.revision()
        deleted = []
        for obj in registry.list_(self.store, t.kind.kind, t.namespace if t.kind.namespaced else None):
            if not keep(obj) or api.protected(t.kind.kind, obj["metadata"].get("namespace"),
                                              obj["metadata"]["name"]):
                continue
            try:
                self._delete_one(t, obj["metadata"]["name"], options)
            except api.ApiError as err:
                if err.reason != "NotFound":       # gone meanwhile: nothing left to do
                    raise
                continue
            deleted.append(self._present(obj, t))
        return _json(200, {"kind": f"{t.kind.kind}List", "apiVersion": t.gv,
                           "metadata": {"resourceVersion": str(rev)}, "items": deleted})

    # -- /scale -----------------------------------------------------------------

    def _scale_of(self, obj: dict, t: Target) -> dict:
        spec, st = obj.get("spec") or {}, obj.get("status") or {}
        meta = obj["metadata"]
        selector = spec.get("selector")
        if t.kind.kind == "ReplicationController":
            text = ",".join(f"{k}={v}" for k, v in sorted((selector or {}).items()))
        else:
            from netemu.kubectl_tables import selector_string
            text = selector_string(selector)
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                   "creationTimestamp") if k in meta},
                "spec": {"replicas": int(spec.get(t.kind.scale_field, 1))},
                "status": {"replicas": int(st.get("replicas") or 0), "selector": text}}

    async def _scale(self, req: Request, t: Target) -> Response:
        current = self._read(t)
        if current is None:
            return status.not_found(t.qualified, t.name, t.group)
        if req.method == "GET":
            return _json(200, self._scale_of(current, t))
        if req.method not in ("PUT", "PATCH"):
            return status.method_not_allowed()
        scale = self._scale_of(current, t)
        if req.method == "PATCH":
            scale = self._patched(req, scale, "Scale")
            if not isinstance(scale, dict):
                raise api.ApiError("the patch must leave an object", reason="BadRequest")
        else:
            scale = self._body(req)
            meta = scale.get("metadata")
            if meta is not None and not isinstance(meta, dict):
                raise api.ApiError('Scale in version "v1" cannot be handled as a Scale: metadata must be '
                                   "an object", reason="BadRequest")
            want = (meta or {}).get("resourceVersion")
            if want and str(want) != current["metadata"]["resourceVersion"]:
                return status.error("Conflict", f'Operation cannot be fulfilled on {t.qualified} '
                                    f'"{t.name}": the object has been modified; please apply your changes '
                                    "to the latest version and try again")
        spec = scale.get("spec")
        replicas = spec.get("replicas") if isinstance(spec, dict) else None
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            return status.error("Invalid", f'Scale.autoscaling "{t.name}" is invalid: spec.replicas: '
                                f"Invalid value: {json.dumps(replicas)}: must be an integer")
        if replicas < 0:
            return status.error("Invalid", f'Scale.autoscaling "{t.name}" is invalid: spec.replicas: '
                                f"Invalid value: {replicas}: must be greater than or equal to 0")
        return _json(200, self._scale_of(self._set_replicas(t, replicas, self._tracker(req, t, "scale")), t))

    def _set_replicas(self, t: Target, replicas: int, managed=None) -> dict:
        """The object with its scale field at REPLICAS, written through
        admission (an update on what was read, read again on a conflict)."""
        for _ in range(20):
            current = self._read(t)
            if current is None:
                raise api.ApiError(f'{t.qualified} "{t.name}" not found', reason="NotFound")
            changed = copy.deepcopy(current)
            changed.setdefault("spec", {})[t.kind.scale_field] = replicas
            try:
                stored, _ = api.update(self.store, changed, self.settings, managed=managed)
                return stored
            except api.ApiError as err:
                if err.reason != "Conflict":
                    raise
        raise api.ApiError(f'Operation cannot be fulfilled on {t.qualified} "{t.name}": too many concurrent '
                           "changes", reason="Conflict")

    # -- pods/log -----------------------------------------------------------------

    async def _log_anywhere(self, req: Request, t: Target) -> Response:
        """pods/log of a pod of this machine (_log), or, on a cluster over
        several machines, of a pod of another machine: asked of its node's
        kubelet port and streamed back as it comes (node/kubeletport.py)."""
        from netemu.node import kubeletport

        pod = self._pod_of_subresource(t) if self.cluster else None
        node = kubeletport.elsewhere(self.cluster, self.store, pod) if isinstance(pod, dict) else None
        if node is None or req.method != "GET":
            return self._log(req, t)
        containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
        container = req.arg("container") or (containers[0] if len(containers) == 1 else None)
        if container is None:
            return self._log(req, t)        # its answer: a container name must be specified
        try:
            resp = await trio.to_thread.run_sync(kubeletport.open_log, self.cluster, self.store, node,
                                                 t.namespace or "default", t.name, container, req.query)
        except kubeletport.KubeletError as e:
            return status.error("InternalError", str(e), code=500)
        content_type = resp.getheader("Content-Type", "text/plain")
        if req.arg("follow") not in ("true", "1"):
            try:
                body = await trio.to_thread.run_sync(resp.read)
            finally:
                resp.close()
            return Response(resp.status, body, content_type)

        async def stream(write) -> None:
            try:
                while chunk := await trio.to_thread.run_sync(resp.read1, 65536, abandon_on_cancel=True):
                    await write(chunk)
            finally:
                # The client went away (or the log ended): a reader thread may
                # still be blocked in the response; wake it, and let it close.
                kubeletport.hang_up(resp)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(resp.close)
        return Response(resp.status, stream, content_type)

    def _log(self, req: Request, t: Target) -> Response:
        """A container's output, as the kubelet serves it through the API server.
        The kubelet keeps the log of the running instance and of the one before
        it (previous=true: names.container_log), and when each line was written
        (timestamps=true, sinceSeconds, sinceTime: node/logstamps.py). As the
        kubelet, tailLines picks the lines first, then since filters them, then
        limitBytes cuts what is sent (timestamps included)."""
        if req.method != "GET":
            return status.method_not_allowed()
        pod = self._pod_of_subresource(t)
        if isinstance(pod, Response):
            return pod
        previous = req.arg("previous") in ("true", "1")
        containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
        container = req.arg("container")
        if not container:
            if len(containers) != 1:
                return status.bad_request(f"a container name must be specified for pod {t.name}, "
                                          f"choose one of: [{' '.join(containers)}]")
            container = containers[0]
        if container not in containers:
            return status.bad_request(f"container {container} is not valid for pod {t.name}")
        try:
            tail = int(req.arg("tailLines")) if req.arg("tailLines") else None
            limit = int(req.arg("limitBytes")) if req.arg("limitBytes") else None
        except ValueError:
            return status.bad_request("tailLines and limitBytes must be integers")
        if (tail is not None and tail < 0) or (limit is not None and limit <= 0):
            return status.error("Invalid", 'PodLogOptions "" is invalid: tailLines or limitBytes: '
                                "Invalid value: must be greater than or equal to 0 (limitBytes: 1)")
        since = self._log_since(req)
        if isinstance(since, Response):
            return since
        pod_dir = self.pod_dir(t.namespace or "default", t.name)
        path = names.container_log(pod_dir, container, previous)
        try:
            with open(path, "rb") as f:
                data = f.read()
                read_up_to = f.tell()           # a followed log goes on from exactly here
        except FileNotFoundError:
            if previous:      # the container never restarted: the kubelet's words
                return status.bad_request(f'previous terminated container "{container}" in pod "{t.name}" '
                                          "not found")
            reason = next((((cs.get("state") or {}).get("waiting") or {}).get("reason")
                           for cs in (pod.get("status") or {}).get("containerStatuses") or []
                           if cs.get("name") == container), None) or "ContainerCreating"
            return status.bad_request(f'container "{container}" in pod "{t.name}" is waiting to start: {reason}')
        base = 0
        if tail is not None:
            lines = data.splitlines(keepends=True)
            kept = b"".join(lines[len(lines) - tail:]) if tail else b""
            base, data = len(data) - len(kept), kept
        lines = _LogLines(names.container_log_times(pod_dir, container, previous),
                          req.arg("timestamps") in ("true", "1"), since)
        following = req.arg("follow") in ("true", "1") and not previous
        # A previous instance has ended: its log is whole, there is nothing to follow.
        data = lines.feed(data, base, final=not following)
        if limit is not None:
            data = data[:limit]
        if not following or (limit is not None and len(data) >= limit):
            return Response(200, data, "text/plain")
        return Response(200, lambda write: self._follow(write, t, path, read_up_to, data, limit, lines),
                        "text/plain")

    def _log_since(self, req: Request) -> int | None | Response:
        """?sinceSeconds= or ?sinceTime= as a time in ns, None if neither;
        the API server's refusals otherwise."""
        seconds, when = req.arg("sinceSeconds"), req.arg("sinceTime")
        if seconds and when:
            return status.error("Invalid", 'PodLogOptions "" is invalid: sinceSeconds: Forbidden: at most one '
                                "of `sinceTime` or `sinceSeconds` may be specified")
        if seconds:
            try:
                value = int(seconds)
            except ValueError:
                return status.bad_request(f'sinceSeconds: invalid value "{seconds}": must be an integer')
            if value < 1:
                return status.error("Invalid", 'PodLogOptions "" is invalid: sinceSeconds: Invalid value: '
                                    f"{value}: must be greater than 0")
            return time.time_ns() - min(value, 2 ** 33) * 1_000_000_000
        if when:
            try:
                return logstamps.parse_rfc3339(when)
            except (ValueError, OverflowError, OSError):
                return status.bad_request(f'parsing time "{when}" as "2006-01-02T15:04:05Z07:00": '
                                          "cannot parse as RFC 3339")
        return None

    async def _follow(self, write, t: Target, path: str, offset: int, first: bytes, limit: int | None,
                      lines: "_LogLines") -> None:
        """Stream the log as it grows until the container stops for good (its
        pod finished or gone) or limitBytes is reached."""
        sent = len(first)
        await write(first)
        with open(path, "rb") as f:
            f.seek(offset)
            while True:
                at = f.tell()
                chunk = f.read(65536)
                if chunk:
                    out = lines.feed(chunk, at)
                    if limit is not None:
                        out = out[:limit - sent]
                    sent += len(out)
                    if out:
                        await write(out)
                    if limit is not None and sent >= limit:
                        return
                    continue
                pod = self._read(t)
                if pod is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    at = f.tell()
                    rest = lines.feed(f.read(), at, final=True)
                    if rest:
                        await write(rest[:None if limit is None else limit - sent])
                    return
                await trio.sleep(FOLLOW_POLL)

    # -- pods/exec, attach, portforward ------------------------------------------------

    async def _stream(self, req: Request, t: Target) -> Response:
        """exec, attach and port-forward, over WebSocket or SPDY (podstream.py);
        of a pod of another machine, relayed to its node's kubelet port."""
        pod = self._pod_of_subresource(t)
        if isinstance(pod, Response):
            return pod
        from netemu.node import kubeletport

        node = kubeletport.elsewhere(self.cluster, self.store, pod) if self.cluster else None
        namespace = t.namespace or "default"
        if node is not None:
            return await self._stream_elsewhere(req, t, pod, node)
        if t.subresource == "exec":
            return podstream.exec_(self, req, pod, namespace, t.name)
        if t.subresource == "attach":
            return podstream.attach(self, req, pod, namespace, t.name, lambda: self._read(t))
        return podstream.port_forward(self, req, pod, namespace, t.name)

    async def _stream_elsewhere(self, req: Request, t: Target, pod: dict, node: dict) -> Response:
        """exec, attach or port-forward of a pod of another machine, as
        kube-apiserver serves them: the same request (its upgrade and query)
        made to the pod's node's kubelet port (node/kubeletport.py); its 101
        is passed on with the headers it came with, and from then on the
        connection's bytes are relayed both ways, unread. A refusal (no such
        container, not running, an upgrade it does not serve) is passed on
        as it came."""
        from netemu.node import kubeletport

        if req.method not in ("GET", "POST"):
            return status.method_not_allowed()
        if not req.headers.get("upgrade"):
            return status.bad_request("unable to upgrade connection: Upgrade request required "
                                      "(websocket or SPDY/3.1)")
        container = None
        if t.subresource != "portforward":
            container = podstream.container_of(req, pod, t.name)
            if isinstance(container, Response):
                return container
        query = {k: v for k, v in req.query.items() if k != "container"}
        target = kubeletport.kubelet_path(t.subresource, t.namespace or "default", t.name, container)
        if query:
            target += "?" + urllib.parse.urlencode(query, doseq=True)
        try:
            code, headers, body, stream, trailing = await kubeletport.open_upgrade(
                self.cluster, self.store, node, req.method, target, req.headers)
        except kubeletport.KubeletError as e:
            return status.error("InternalError", str(e), code=500)
        if stream is None:
            content_type = next((v for k, v in headers if k.lower() == "content-type"), "application/json")
            return Response(code, body, content_type)

        async def relay(client, client_trailing: bytes) -> None:
            await kubeletport.relay(client, client_trailing, stream, trailing)

        return Response(101, b"", headers=headers, upgrade=relay)


def ensure_system_namespaces(store) -> None:
    """default, kube-system, kube-public and kube-node-lease exist, as
    kube-apiserver makes sure at start."""
    for name in manifests.BUILTIN_NAMESPACES:
        try:
            api.create(store, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        except api.ApiError as err:
            if err.reason != "AlreadyExists":
                raise

