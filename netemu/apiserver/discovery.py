"""Discovery documents: what the server serves, as kubectl learns it.

kubectl resolves `po`, `svc`, `rc`, `get all` and the group of a bare kind from
these lists (KUBE-API.md, "Discovery"); they are built from netemu.k8s.kinds.
"""

from __future__ import annotations

from netemu.k8s import kinds

# The Kubernetes version netemu's API answers as (`kubectl version`): the
# newest kubectl on the machine (1.32) is within its skew policy of it.
VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-netemu", "gitCommit": "",
           "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "",
           "compiler": "netemu", "platform": "linux/amd64"}


def api_versions(server_address: str) -> dict:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def _group(name: str) -> dict:
    versions = [gv for gv in kinds.GROUP_VERSIONS if gv.split("/")[0] == name and "/" in gv]
    entries = [{"groupVersion": gv, "version": gv.split("/")[1]} for gv in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def groups() -> list[str]:
    seen: list[str] = []
    for gv in kinds.GROUP_VERSIONS:
        if "/" in gv and gv.split("/")[0] not in seen:
            seen.append(gv.split("/")[0])
    return seen


def api_group_list() -> dict:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(g) for g in groups()]}


def api_group(name: str) -> dict | None:
    if name not in groups():
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name)}


def resource_list(group_version: str) -> dict | None:
    served = kinds.served(group_version)
    if not served:
        return None
    resources = []
    for k in sorted(served, key=lambda k: k.resource):
        entry = {"name": k.resource, "singularName": k.singular, "namespaced": k.namespaced,
                 "kind": k.kind, "verbs": list(k.verbs)}
        # Short names and `kubectl get all` lead to the version a kind is stored
        # in, not again to extensions/v1beta1 (kubectl warns of short names
        # that two groups claim).
        if k.short_names and k.group_version == group_version:
            entry["shortNames"] = list(k.short_names)
        if k.categories and k.group_version == group_version:
            entry["categories"] = list(k.categories)
        resources.append(entry)
        if k.kind == "Pod" and group_version == "v1":
            resources.append({"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod",
                              "verbs": ["get"]})
            resources.append({"name": "pods/exec", "singularName": "", "namespaced": True,
                              "kind": "PodExecOptions", "verbs": ["create", "get"]})
        if k.kind in kinds.WITH_STATUS:
            resources.append({"name": f"{k.resource}/status", "singularName": "", "namespaced": k.namespaced,
                              "kind": k.kind, "verbs": ["get", "patch", "update"]})
        if k.scale_field:
            resources.append({"name": f"{k.resource}/scale", "singularName": "", "namespaced": k.namespaced,
                              "group": "autoscaling", "version": "v1", "kind": "Scale",
                              "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}


# Aggregated discovery (apidiscovery.k8s.io): every group, version and resource
# in one answer to /api and one to /apis, so kubectl ≥ 1.26 learns the server in
# two requests instead of one per group version. kubectl 1.26–1.29 ask for
# v2beta1, 1.30 and later for v2 first; the two documents are the same shape.
AGGREGATED_VERSIONS = ("v2", "v2beta1")


def aggregated_content_type(version: str) -> str:
    return f"application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"


def wants_aggregated(accept: str | None) -> str | None:
    """The apidiscovery version an Accept header asks for before any plain
    JSON, or None when it asks for the legacy documents (or nothing)."""
    for entry in (accept or "").split(","):
        mime, *params = [p.strip() for p in entry.split(";")]
        if mime not in ("application/json", "application/*", "*/*"):
            continue
        args = dict(p.split("=", 1) for p in params if "=" in p)
        if "g" not in args and "as" not in args:
            return None                       # plain JSON comes first: legacy
        if (args.get("g") == "apidiscovery.k8s.io" and args.get("as") == "APIGroupDiscoveryList"
                and args.get("v") in AGGREGATED_VERSIONS):
            return args["v"]
    return None


def _resource_discovery(group_version: str) -> list[dict]:
    """resource_list(GROUP_VERSION) regrouped as APIResourceDiscovery: each
    resource with its subresources (pods/log, */scale) nested under it."""
    group, _, version = group_version.rpartition("/")
    top: dict[str, dict] = {}
    for entry in resource_list(group_version)["resources"]:
        kind = {"group": entry.get("group", group), "version": entry.get("version", version),
                "kind": entry["kind"]}
        if "/" in entry["name"]:
            parent, sub = entry["name"].split("/", 1)
            top[parent].setdefault("subresources", []).append(
                {"subresource": sub, "responseKind": kind, "verbs": entry["verbs"]})
            continue
        doc = {"resource": entry["name"], "responseKind": kind,
               "scope": "Namespaced" if entry["namespaced"] else "Cluster",
               "singularResource": entry["singularName"], "verbs": entry["verbs"]}
        for field in ("shortNames", "categories"):
            if field in entry:
                doc[field] = entry[field]
        top[entry["name"]] = doc
    return list(top.values())


def aggregated(root: str, version: str) -> dict:
    """The APIGroupDiscoveryList for /api (ROOT "api": the core group, named
    "") or /apis (every named group, versions newest first as served)."""
    if root == "api":
        names = [""]
    else:
        names = groups()
    items = []
    for name in names:
        gvs = ["v1"] if name == "" else [gv for gv in kinds.GROUP_VERSIONS if gv.split("/")[0] == name
                                          and "/" in gv]
        items.append({"metadata": {"name": name, "creationTimestamp": None},
                      "versions": [{"version": gv.rpartition("/")[2], "resources": _resource_discovery(gv),
                                    "freshness": "Current"} for gv in gvs]})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": f"apidiscovery.k8s.io/{version}",
            "metadata": {}, "items": items}
