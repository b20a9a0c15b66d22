"""Server-side Tables (meta.k8s.io/v1): the columns `kubectl get` prints.

kubectl asks for a Table and prints its columns as they come; without one it
can only print NAME and AGE. The columns and cells are netemu's printers'
(printers.py for pods and nodes, kubectl_tables.py for the rest), which follow
kubectl's own printers. The -o wide columns are the ones after the default
ones, sent with priority 1 (kubectl shows them only with -o wide).
"""

from __future__ import annotations

from netemu import kubectl_tables, printers



def _endpoint_slice_row(es: dict) -> list[str]:
    """kubectl's printEndpointSlice: ports and at most three addresses."""
    ports = ",".join(str(p["port"]) for p in es.get("ports") or [] if p.get("port") is not None) or "<unset>"
    addresses = [a for ep in es.get("endpoints") or [] for a in ep.get("addresses") or []]
    shown = ",".join(addresses[:3]) or "<unset>"
    if len(addresses) > 3:
        shown += f" + {len(addresses) - 3} more..."
    return [es["metadata"]["name"], es.get("addressType", ""), ports, shown,
            printers.age(es["metadata"].get("creationTimestamp"))]


def _columns(kind: str) -> tuple[list[str], list[str], object]:
    """(all headers, wide-only headers, row(obj) -> every cell)."""
    if kind == "Namespace":
        return ["NAME", "STATUS", "AGE"], [], lambda o: [
            o["metadata"]["name"], (o.get("status") or {}).get("phase", ""),
            printers.age(o["metadata"].get("creationTimestamp"))]
    if kind == "Lease":
        return ["NAME", "HOLDER", "AGE"], [], lambda o: [
            o["metadata"]["name"], (o.get("spec") or {}).get("holderIdentity", ""),
            printers.age(o["metadata"].get("creationTimestamp"))]
    if kind == "EndpointSlice":
        return ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"], [], _endpoint_slice_row
    if kind == "Pod":
        return (printers.POD_HEADERS + printers.POD_WIDE, printers.POD_WIDE,
                lambda o: printers.pod_row(o, True))
    if kind == "Node":
        # BACKEND: the overlay daemon's flannel annotation on the Node.
        return (printers.NODE_HEADERS + printers.NODE_WIDE, printers.NODE_WIDE,
                lambda o: printers.node_row(o, True))
    headers, wide, row = kubectl_tables.TABLES[kind]
    if wide is None:            # events: -o wide has its own column order
        narrow = set(headers)
        all_headers = kubectl_tables.EVENT_WIDE
        return all_headers, [h for h in all_headers if h not in narrow], lambda o: row(o, True)
    return headers + wide, wide, lambda o: row(o, True)


def _description(header: str) -> str:
    return f"{header.title()} as kubectl prints it"


def _partial(obj: dict, table_version: str) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{table_version}",
            "metadata": obj["metadata"]}


def table(kind: str, objs: list[dict], resource_version: str, table_version: str = "v1",
          include_object: str = "Metadata", columns: bool = True) -> dict:
    """The Table of OBJS. include_object: None, Metadata (default) or Object,
    as the ?includeObject= parameter asks. columns=False leaves out the column
    definitions (watch events after the first, as the API server does)."""
    headers, wide, row = _columns(kind)
    wide_set = set(wide)
    defs = [{"name": h, "type": "string", "format": "name" if h == "NAME" else "",
             "description": _description(h), "priority": 1 if h in wide_set else 0}
            for h in headers]
    rows = []
    for obj in objs:
        entry: dict = {"cells": row(obj)}
        if include_object == "Object":
            entry["object"] = obj
        elif include_object != "None":
            entry["object"] = _partial(obj, table_version)
        rows.append(entry)
    out = {"kind": "Table", "apiVersion": f"meta.k8s.io/{table_version}",
           "metadata": {"resourceVersion": resource_version}, "rows": rows}
    if columns:
        out["columnDefinitions"] = defs
    return out


def wants_table(accept: str | None) -> str | None:
    """The Table version the Accept header asks for first ("v1", "v1beta1"), or
    None when it asks for plain objects first."""
    for part in (accept or "").split(","):
        params = dict(p.strip().split("=", 1) for p in part.split(";")[1:] if "=" in p)
        media = part.split(";")[0].strip()
        if media not in ("application/json", "*/*", "application/*"):
            continue
        if params.get("as") == "Table" and params.get("g") == "meta.k8s.io" \
                and params.get("v") in ("v1", "v1beta1"):
            return params["v"]
        if "as" not in params:
            return None
    return None
