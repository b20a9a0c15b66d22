"""kubectl's `get` tables and `describe` texts for the kinds beyond pods and nodes.

Services, Endpoints, ReplicationControllers, ReplicaSets, Deployments, Jobs,
DaemonSets and Events are printed with kubectl's column names and cell formats
(kubernetes pkg/printers/internalversion/printers.go) and described with its
field names and layout (kubectl pkg/describe/describe.go), so that the output of
a netemu command reads like the tutorial's kubectl output:

    supports(kind)                         -> is there a table for KIND?
    tabulate(kind, objs, wide, store)      -> (headers, rows) for `get`
    describe(kind, obj, events, store)     -> the `describe` text (KeyError: no describer)

kubectl lays its describe text out with Go's text/tabwriter: a cell ends at a
tab, and consecutive lines that have a cell in the same column are padded to the
widest of them. `_TabWriter` reproduces that algorithm, which is why a describer
here writes "Name:\t%s" lines exactly as kubectl's does and lets the layout fall
out; the padding then matches kubectl's byte for byte (e.g. `Port:  <unset>  80/TCP`).

The store is read for what kubectl would fetch with further requests: a
Service's Endpoints, a controller's pods (for "Pods Status") and a Deployment's
ReplicaSets. It may be None (nothing more is read).
"""

from __future__ import annotations

import datetime

from netemu import printers
from netemu.k8s import selectors
from netemu.store import registry

# -- cell formats shared by tables and describers ---------------------------------


def format_labels(labels: dict | None) -> str:
    """labels.FormatLabels: `k=v,k2=v2` sorted by key, `<none>` when empty."""
    if not labels:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def selector_string(selector: dict | None) -> str:
    """LabelSelectorAsSelector(...).String(), as `describe job|deployment` prints
    the Selector: like selectors.format_selector but empty rather than `<none>`."""
    text = selectors.format_selector(selector)
    return "" if text == "<none>" else text


def _template_spec(obj: dict) -> dict:
    return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}


def container_cells(obj: dict) -> list[str]:
    """The CONTAINERS and IMAGES cells of a workload's wide row."""
    containers = _template_spec(obj).get("containers") or []
    return [",".join(c.get("name", "") for c in containers), ",".join(c.get("image", "") for c in containers)]


def port_string(ports: list[dict] | None) -> str:
    """PORT(S): `80/TCP`, `80:30812/TCP` with a nodePort, comma separated."""
    pieces = []
    for p in ports or []:
        proto = p.get("protocol", "TCP")
        if p.get("nodePort"):
            pieces.append(f"{p['port']}:{p['nodePort']}/{proto}")
        else:
            pieces.append(f"{p['port']}/{proto}")
    return ",".join(pieces) or "<none>"


LOAD_BALANCER_WIDTH = 16


def _ingress_list(svc: dict, wide: bool) -> str:
    """loadBalancerStatusStringer: the ingress addresses, sorted and de-duplicated,
    clipped to 16 characters outside -o wide."""
    found = set()
    for ing in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        if ing.get("ip"):
            found.add(ing["ip"])
        elif ing.get("hostname"):
            found.add(ing["hostname"])
    text = ",".join(sorted(found))
    if not wide and len(text) > LOAD_BALANCER_WIDTH:
        text = text[:LOAD_BALANCER_WIDTH - 3] + "..."
    return text


def external_ip(svc: dict, wide: bool = False) -> str:
    """EXTERNAL-IP: externalIPs, else `<none>` for ClusterIP and NodePort; the load
    balancer's address or `<pending>` for LoadBalancer; the name for ExternalName."""
    spec = svc.get("spec") or {}
    svc_type = spec.get("type", "ClusterIP")
    external = spec.get("externalIPs") or []
    if svc_type in ("ClusterIP", "NodePort"):
        return ",".join(external) if external else "<none>"
    if svc_type == "LoadBalancer":
        lb = _ingress_list(svc, wide)
        if external:
            return ",".join(([lb] if lb else []) + list(external))
        return lb or "<pending>"
    if svc_type == "ExternalName":
        return spec.get("externalName", "")
    return "<unknown>"


def format_endpoints(endpoints: dict | None, port_names: set[str] | None = None) -> str:
    """`10.244.1.2:80,10.244.2.2:80`, at most three then ` + N more...`; only the
    ports named in PORT_NAMES when given (describe service, per port); `<none>`
    without subsets. Not-ready addresses are not listed, as in kubectl."""
    subsets = (endpoints or {}).get("subsets") or []
    if not subsets:
        return "<none>"
    shown: list[str] = []
    count = 0
    limit = 3
    more = False
    for ss in subsets:
        addresses = ss.get("addresses") or []
        ports = ss.get("ports") or []
        if not ports:                       # a headless service without ports
            count += len(addresses)
            for a in addresses:
                if len(shown) == limit:
                    more = True
                    break
                shown.append(a["ip"])
            continue
        for port in ports:
            if port_names is not None and port.get("name", "") not in port_names:
                continue
            count += len(addresses)
            for a in addresses:
                if len(shown) == limit:
                    more = True
                    break
                shown.append(f"{a['ip']}:{port['port']}")
    text = ",".join(shown)
    if more:
        return f"{text} + {count - limit} more..."
    return text


def _condition(obj: dict, type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def job_status_word(job: dict) -> str:
    """STATUS of `kubectl get job` (kubectl >= 1.30)."""
    if _condition(job, "Complete"):
        return "Complete"
    if _condition(job, "Failed"):
        return "Failed"
    if job["metadata"].get("deletionTimestamp"):
        return "Terminating"
    if _condition(job, "Suspended"):
        return "Suspended"
    if _condition(job, "FailureTarget"):
        return "FailureTarget"
    if _condition(job, "SuccessCriteriaMet"):
        return "SuccessCriteriaMet"
    return "Running"


def job_completions(job: dict) -> str:
    """COMPLETIONS: `succeeded/completions`; without completions `n/1` (or
    `n/1 of P` with parallelism P > 1, the work-queue pattern)."""
    spec, status = job.get("spec") or {}, job.get("status") or {}
    succeeded = int(status.get("succeeded") or 0)
    if spec.get("completions") is not None:
        return f"{succeeded}/{spec['completions']}"
    parallelism = int(spec.get("parallelism") or 0)
    return f"{succeeded}/1 of {parallelism}" if parallelism > 1 else f"{succeeded}/1"


def job_duration(job: dict, now: datetime.datetime | None = None) -> str:
    """DURATION: startTime to completionTime, or to now while it runs; empty before
    it started."""
    status = job.get("status") or {}
    start = registry.parse_time(status.get("startTime"))
    if start is None:
        return ""
    end = registry.parse_time(status.get("completionTime"))
    if end is None:
        end = now or datetime.datetime.now(datetime.timezone.utc)
    return printers.duration((end - start).total_seconds())


def _age(obj: dict) -> str:
    return printers.age(obj["metadata"].get("creationTimestamp"))


def _int(value) -> str:
    return str(int(value or 0))


# -- tables -------------------------------------------------------------------------

WORKLOAD_WIDE = ["CONTAINERS", "IMAGES", "SELECTOR"]


def _service_row(svc: dict, wide: bool) -> list[str]:
    spec = svc.get("spec") or {}
    row = [svc["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP") or "<none>",
           external_ip(svc, wide), port_string(spec.get("ports")), _age(svc)]
    if wide:
        row.append(format_labels(spec.get("selector")))
    return row


def _replicas_row(obj: dict, wide: bool) -> list[str]:
    """ReplicationController and ReplicaSet: DESIRED CURRENT READY AGE."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    row = [obj["metadata"]["name"], _int(spec.get("replicas", 1)), _int(status.get("replicas")),
           _int(status.get("readyReplicas")), _age(obj)]
    if wide:
        row += container_cells(obj) + [selectors.format_selector(spec.get("selector"))]
    return row


def _deployment_row(obj: dict, wide: bool) -> list[str]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    row = [obj["metadata"]["name"],
           f"{int(status.get('readyReplicas') or 0)}/{int(spec.get('replicas', 1))}",
           _int(status.get("updatedReplicas")), _int(status.get("availableReplicas")), _age(obj)]
    if wide:
        row += container_cells(obj) + [selectors.format_selector(spec.get("selector"))]
    return row


def _job_row(job: dict, wide: bool) -> list[str]:
    row = [job["metadata"]["name"], job_status_word(job), job_completions(job), job_duration(job), _age(job)]
    if wide:
        row += container_cells(job) + [selectors.format_selector((job.get("spec") or {}).get("selector"))]
    return row


def _daemonset_row(ds: dict, wide: bool) -> list[str]:
    status = ds.get("status") or {}
    row = [ds["metadata"]["name"], _int(status.get("desiredNumberScheduled")),
           _int(status.get("currentNumberScheduled")), _int(status.get("numberReady")),
           _int(status.get("updatedNumberScheduled")), _int(status.get("numberAvailable")),
           format_labels(_template_spec(ds).get("nodeSelector")), _age(ds)]
    if wide:
        row += container_cells(ds) + [selectors.format_selector((ds.get("spec") or {}).get("selector"))]
    return row


def _endpoints_row(ep: dict, wide: bool) -> list[str]:
    return [ep["metadata"]["name"], format_endpoints(ep), _age(ep)]


def _event_times(ev: dict) -> tuple[str, str]:
    """(last seen, first seen) as kubectl prints them; `(xN over T)` when repeated."""
    first = printers.age(ev.get("firstTimestamp") or ev.get("eventTime"))
    last = printers.age(ev["lastTimestamp"]) if ev.get("lastTimestamp") else first
    count = int(ev.get("count") or 1)
    if count > 1:
        last = f"{last} (x{count} over {first})"
    return last, first


def _event_row(ev: dict, wide: bool) -> list[str]:
    involved = ev.get("involvedObject") or {}
    target = involved.get("kind", "").lower()
    if involved.get("name"):
        target = f"{target}/{involved['name']}"
    last, first = _event_times(ev)
    message = (ev.get("message") or "").strip()
    if not wide:
        return [last, ev.get("type", ""), ev.get("reason", ""), target, message]
    return [last, ev.get("type", ""), ev.get("reason", ""), target, involved.get("fieldPath", ""),
            (ev.get("source") or {}).get("component", ""), message, first, str(int(ev.get("count") or 1)),
            ev["metadata"]["name"]]


# kind -> (headers, extra -o wide headers, row function)
TABLES = {
    "Service": (["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"], ["SELECTOR"], _service_row),
    "ReplicationController": (["NAME", "DESIRED", "CURRENT", "READY", "AGE"], WORKLOAD_WIDE, _replicas_row),
    "ReplicaSet": (["NAME", "DESIRED", "CURRENT", "READY", "AGE"], WORKLOAD_WIDE, _replicas_row),
    "Deployment": (["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"], WORKLOAD_WIDE, _deployment_row),
    "Job": (["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"], WORKLOAD_WIDE, _job_row),
    "DaemonSet": (["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE", "NODE SELECTOR", "AGE"],
                  WORKLOAD_WIDE, _daemonset_row),
    "Endpoints": (["NAME", "ENDPOINTS", "AGE"], [], _endpoints_row),
    # kubectl's printConfigMap: DATA counts data and binaryData keys.
    "ConfigMap": (["NAME", "DATA", "AGE"], [], lambda o, wide: [
        o["metadata"]["name"], str(len(o.get("data") or {}) + len(o.get("binaryData") or {})), _age(o)]),
    # -o wide replaces the event columns rather than adding to them.
    "Event": (["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"], None, _event_row),
}

EVENT_WIDE = ["LAST SEEN", "TYPE", "REASON", "OBJECT", "SUBOBJECT", "SOURCE", "MESSAGE", "FIRST SEEN",
              "COUNT", "NAME"]


def supports(kind: str) -> bool:
    return kind in TABLES


def tabulate(kind: str, objs: list[dict], wide: bool, store=None) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of `kubectl get KIND` for OBJS (in the order given)."""
    headers, wide_headers, row = TABLES[kind]
    if wide:
        headers = EVENT_WIDE if wide_headers is None else headers + wide_headers
    return list(headers), [row(o, wide) for o in objs]


# -- Go's text/tabwriter, as kubectl describe configures it -----------------------


class _TabWriter:
    """kubectl describe's PrefixWriter over tabwriter.NewWriter(out, 0, 8, 2, ' ', 0).

    write(level, text) appends TEXT indented by two spaces per level; flush()
    lays out what was written so far (kubectl flushes before the events table, so
    that table is aligned on its own)."""

    PADDING = 2

    def __init__(self):
        self.done: list[str] = []
        self.pending = ""

    def write(self, level: int, text: str) -> None:
        self.pending += "  " * level + text

    def flush(self) -> None:
        if self.pending:
            self.done.append(_layout(self.pending, self.PADDING))
        self.pending = ""

    def text(self) -> str:
        self.flush()
        return "".join(self.done)


def _layout(text: str, padding: int) -> str:
    """Go's tabwriter.format: a column block is a run of consecutive lines that
    have a tab-terminated cell in that column; each such cell is padded to the
    block's widest cell plus PADDING. The text after a line's last tab is not part
    of any column."""
    trailing_newline = text.endswith("\n")
    lines = [line.split("\t") for line in (text[:-1] if trailing_newline else text).split("\n")]
    out: list[str] = [""] * len(lines)
    widths: list[int] = []

    def emit(line0: int, line1: int) -> None:
        for i in range(line0, line1):
            cells = lines[i]
            parts = []
            for j, cell in enumerate(cells):
                if j < len(widths) and j < len(cells) - 1:
                    parts.append(cell + " " * (widths[j] - len(cell)))
                else:
                    parts.append(cell)
            out[i] = "".join(parts)

    def fmt(line0: int, line1: int) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            emit(line0, this)
            line0 = this
            width = 0
            while this < line1 and column < len(lines[this]) - 1:
                width = max(width, len(lines[this][column]) + padding)
                this += 1
            widths.append(width)
            fmt(line0, this)
            widths.pop()
            line0 = this
        emit(line0, line1)

    fmt(0, len(lines))
    return "\n".join(out) + ("\n" if trailing_newline else "")


# -- describe pieces, after kubectl's describe.go -----------------------------------


def _labels_multiline(w: _TabWriter, title: str, labels: dict | None, indent: str = "") -> None:
    w.write(0, f"{indent}{title}:\t")
    if not labels:
        w.write(0, "<none>\n")
        return
    for i, key in enumerate(sorted(labels)):
        if i:
            w.write(0, f"{indent}\t")
        w.write(0, f"{key}={labels[key]}\n")


MAX_ANNOTATION_LEN = 140
SKIPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def _annotations_multiline(w: _TabWriter, title: str, annotations: dict | None) -> None:
    w.write(0, f"{title}:\t")
    keys = sorted(k for k in (annotations or {}) if k not in SKIPPED_ANNOTATIONS)
    if not keys:
        w.write(0, "<none>\n")
        return
    for i, key in enumerate(keys):
        if i:
            w.write(0, "\t")
        value = str(annotations[key]).rstrip("\n")
        if len(value) + len(key) + 2 > MAX_ANNOTATION_LEN or "\n" in value:
            w.write(0, f"{key}:\n")
            for s in value.split("\n"):
                short = s if len(s) <= MAX_ANNOTATION_LEN - 2 else s[:MAX_ANNOTATION_LEN - 2] + "..."
                w.write(0, f"\t  {short}\n")
        else:
            w.write(0, f"{key}: {value}\n")


def _controller_of(obj: dict) -> str:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return f"{ref['kind']}/{ref['name']}"
    return ""


def _ports_text(ports: list[dict], field: str) -> str:
    pieces = []
    for p in ports:
        text = f"{int(p.get(field) or 0)}/{p.get('protocol', 'TCP')}"
        if p.get("name"):
            text += f" ({p['name']})"
        pieces.append(text)
    return ", ".join(pieces)


def _describe_containers(w: _TabWriter, label: str, containers: list[dict], space: str) -> None:
    w.write(0, f"{space}{label}:{'' if containers else ' <none>'}\n")
    name_indent = " " if space else ""
    for c in containers:
        w.write(1, f"{name_indent}{c.get('name', '')}:\n")
        w.write(2, f"Image:\t{c.get('image', '')}\n")
        ports = c.get("ports") or []
        text = _ports_text(ports, "containerPort")
        w.write(2, f"Ports:\t{text}\n" if "," in text else f"Port:\t{text or '<none>'}\n")
        text = _ports_text(ports, "hostPort")
        w.write(2, f"Host Ports:\t{text}\n" if "," in text else f"Host Port:\t{text or '<none>'}\n")
        for title, items in (("Command", c.get("command")), ("Args", c.get("args"))):
            if items:
                w.write(2, f"{title}:\n")
                for item in items:
                    for s in str(item).split("\n"):
                        w.write(3, f"{s}\n")
        env = c.get("env") or []
        w.write(2, "Environment:" + ("" if env else "\t<none>") + "\n")
        for e in env:
            if "value" in e or "valueFrom" not in e:
                for i, s in enumerate(str(e.get("value", "")).split("\n")):
                    w.write(3, f"{e['name']}:\t{s}\n" if i == 0 else f"\t{s}\n")
            else:
                w.write(3, f"{e['name']}:\t<set from {', '.join(e['valueFrom'])}>\n")
        mounts = c.get("volumeMounts") or []
        w.write(2, "Mounts:" + ("" if mounts else "\t<none>") + "\n")
        for m in sorted(mounts, key=lambda m: m.get("mountPath", "")):
            flags = "ro" if m.get("readOnly") else "rw"
            w.write(3, f"{m.get('mountPath')} from {m.get('name')} ({flags})\n")


def _tolerations_text(t: dict) -> str:
    text = t.get("key", "")
    if t.get("value"):
        text += f"={t['value']}"
    if t.get("effect"):
        text += f":{t['effect']}"
    if t.get("operator") == "Exists" and not t.get("value"):
        text += " op=Exists" if (t.get("key") or t.get("effect")) else "op=Exists"
    if t.get("tolerationSeconds") is not None:
        text += f" for {t['tolerationSeconds']}s"
    return text


def _describe_pod_template(w: _TabWriter, template: dict | None) -> None:
    w.write(0, "Pod Template:\n")
    if template is None:
        w.write(1, "<unset>")
        return
    meta, spec = template.get("metadata") or {}, template.get("spec") or {}
    _labels_multiline(w, "Labels", meta.get("labels"), indent="  ")
    if meta.get("annotations"):
        _annotations_multiline(w, "  Annotations", meta["annotations"])
    if spec.get("serviceAccountName"):
        w.write(1, f"Service Account:\t{spec['serviceAccountName']}\n")
    if spec.get("initContainers"):
        _describe_containers(w, "Init Containers", spec["initContainers"], "  ")
    _describe_containers(w, "Containers", spec.get("containers") or [], "  ")
    volumes = spec.get("volumes") or []
    if not volumes:
        w.write(0, "  Volumes:\t<none>\n")
    else:
        w.write(0, "  Volumes:\n")
        for v in volumes:
            kind = next((k for k in v if k != "name"), "")
            w.write(1, f" {v.get('name')}:\n")
            w.write(2, f"Type:\t{kind}\n")
    if spec.get("priorityClassName"):
        w.write(1, f"Priority Class Name:\t{spec['priorityClassName']}\n")
    _labels_multiline(w, "Node-Selectors", spec.get("nodeSelector"), indent="  ")
    tolerations = sorted(spec.get("tolerations") or [], key=lambda t: t.get("key", ""))
    w.write(0, "  Tolerations:\t")
    if not tolerations:
        w.write(0, "<none>\n")
    for i, t in enumerate(tolerations):
        w.write(0, ("  \t" if i else "") + _tolerations_text(t) + "\n")


def _describe_events(w: _TabWriter, events: list[dict]) -> None:
    """kubectl's DescribeEvents: `Events:  <none>` stays in the column block above;
    a table is laid out on its own (kubectl flushes the tabwriter first)."""
    if not events:
        w.write(0, "Events:\t<none>\n")
        return
    w.flush()
    w.write(0, "Events:\n  Type\tReason\tAge\tFrom\tMessage\n")
    w.write(1, "----\t------\t----\t----\t-------\n")
    for e in sorted(events, key=lambda e: (e.get("lastTimestamp") or e.get("firstTimestamp") or "")):
        first = printers.age(e.get("firstTimestamp") or e.get("eventTime"))
        count = int(e.get("count") or 1)
        interval = f"{printers.age(e.get('lastTimestamp'))} (x{count} over {first})" if count > 1 else first
        message = (e.get("message") or "").strip()
        field_path = (e.get("involvedObject") or {}).get("fieldPath")
        if field_path:
            message = f"{field_path}: {message}"
        w.write(1, f"{e.get('type', '')}\t{e.get('reason', '')}\t{interval}\t"
                   f"{(e.get('source') or {}).get('component', '')}\t{message}\n")


# Go's time.RFC1123Z in the local time zone, as kubectl shows API times; shared
# with the pod and node describers in printers.
_rfc1123z = printers.api_time


def _owned_pods(store, owner: dict) -> list[dict]:
    if store is None:
        return []
    uid = owner["metadata"].get("uid")
    return [p for p in registry.list_(store, "Pod", owner["metadata"].get("namespace", "default"))
            if any(r.get("controller") and r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or [])]


def pod_phase_counts(pods: list[dict]) -> tuple[int, int, int, int]:
    """(running, waiting, succeeded, failed) by phase: Pending counts as waiting."""
    counts = {"Running": 0, "Pending": 0, "Succeeded": 0, "Failed": 0}
    for p in pods:
        phase = (p.get("status") or {}).get("phase") or "Pending"
        if phase in counts:
            counts[phase] += 1
    return counts["Running"], counts["Pending"], counts["Succeeded"], counts["Failed"]


def _pods_status(pods: list[dict]) -> str:
    return "%d Running / %d Waiting / %d Succeeded / %d Failed" % pod_phase_counts(pods)


def _conditions(w: _TabWriter, obj: dict) -> None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    if conditions:
        w.write(0, "Conditions:\n  Type\tStatus\tReason\n")
        w.write(1, "----\t------\t------\n")
        for c in conditions:
            w.write(1, f"{c.get('type')} \t{c.get('status')}\t{c.get('reason', '')}\n")


def _head(w: _TabWriter, obj: dict) -> None:
    meta = obj["metadata"]
    w.write(0, f"Name:\t{meta['name']}\n")
    w.write(0, f"Namespace:\t{meta.get('namespace', 'default')}\n")


# -- describers ---------------------------------------------------------------------


def describe_service(svc: dict, endpoints: dict | None, events: list[dict]) -> str:
    meta, spec = svc["metadata"], svc.get("spec") or {}
    status = svc.get("status") or {}
    w = _TabWriter()
    _head(w, svc)
    _labels_multiline(w, "Labels", meta.get("labels"))
    _annotations_multiline(w, "Annotations", meta.get("annotations"))
    w.write(0, f"Selector:\t{format_labels(spec.get('selector'))}\n")
    w.write(0, f"Type:\t{spec.get('type', 'ClusterIP')}\n")
    if spec.get("ipFamilyPolicy"):
        w.write(0, f"IP Family Policy:\t{spec['ipFamilyPolicy']}\n")
    w.write(0, f"IP Families:\t{','.join(spec.get('ipFamilies') or []) or '<none>'}\n")
    w.write(0, f"IP:\t{spec.get('clusterIP', '')}\n")
    w.write(0, f"IPs:\t{','.join(spec.get('clusterIPs') or []) or '<none>'}\n")
    if spec.get("externalIPs"):
        w.write(0, f"External IPs:\t{','.join(spec['externalIPs'])}\n")
    if spec.get("loadBalancerIP"):
        w.write(0, f"Desired LoadBalancer IP:\t{spec['loadBalancerIP']}\n")
    if spec.get("externalName"):
        w.write(0, f"External Name:\t{spec['externalName']}\n")
    ingress = (status.get("loadBalancer") or {}).get("ingress") or []
    if ingress:
        w.write(0, "LoadBalancer Ingress:\t" + ", ".join(i.get("ip") or i.get("hostname", "") for i in ingress)
                + "\n")
    for p in spec.get("ports") or []:
        name = p.get("name") or "<unset>"
        proto = p.get("protocol", "TCP")
        w.write(0, f"Port:\t{name}\t{p['port']}/{proto}\n")
        w.write(0, f"TargetPort:\t{p.get('targetPort', p['port'])}/{proto}\n")
        if p.get("nodePort"):
            w.write(0, f"NodePort:\t{name}\t{p['nodePort']}/{proto}\n")
        w.write(0, f"Endpoints:\t{format_endpoints(endpoints, {p.get('name', '')}) or '<none>'}\n")
    w.write(0, f"Session Affinity:\t{spec.get('sessionAffinity', 'None')}\n")
    if spec.get("externalTrafficPolicy"):
        w.write(0, f"External Traffic Policy:\t{spec['externalTrafficPolicy']}\n")
    if spec.get("internalTrafficPolicy"):
        w.write(0, f"Internal Traffic Policy:\t{spec['internalTrafficPolicy']}\n")
    if spec.get("healthCheckNodePort"):
        w.write(0, f"HealthCheck NodePort:\t{spec['healthCheckNodePort']}\n")
    if spec.get("loadBalancerSourceRanges"):
        w.write(0, f"LoadBalancer Source Ranges:\t{','.join(spec['loadBalancerSourceRanges'])}\n")
    _describe_events(w, events)
    return w.text()


def describe_replication_controller(rc: dict, pods: list[dict], events: list[dict]) -> str:
    meta, spec, status = rc["metadata"], rc.get("spec") or {}, rc.get("status") or {}
    w = _TabWriter()
    _head(w, rc)
    w.write(0, f"Selector:\t{format_labels(spec.get('selector'))}\n")
    _labels_multiline(w, "Labels", meta.get("labels"))
    _annotations_multiline(w, "Annotations", meta.get("annotations"))
    w.write(0, f"Replicas:\t{int(status.get('replicas') or 0)} current / {int(spec.get('replicas', 1))} desired\n")
    w.write(0, f"Pods Status:\t{_pods_status(pods)}\n")
    _describe_pod_template(w, spec.get("template"))
    _conditions(w, rc)
    _describe_events(w, events)
    return w.text()


def describe_replica_set(rs: dict, pods: list[dict], events: list[dict]) -> str:
    meta, spec, status = rs["metadata"], rs.get("spec") or {}, rs.get("status") or {}
    w = _TabWriter()
    _head(w, rs)
    w.write(0, f"Selector:\t{selectors.format_selector(spec.get('selector'))}\n")
    _labels_multiline(w, "Labels", meta.get("labels"))
    _annotations_multiline(w, "Annotations", meta.get("annotations"))
    if _controller_of(rs):
        w.write(0, f"Controlled By:\t{_controller_of(rs)}\n")
    w.write(0, f"Replicas:\t{int(status.get('replicas') or 0)} current / {int(spec.get('replicas', 1))} desired\n")
    w.write(0, f"Pods Status:\t{_pods_status(pods)}\n")
    _describe_pod_template(w, spec.get("template"))
    _conditions(w, rs)
    _describe_events(w, events)
    return w.text()


def _replica_sets_text(replica_sets: list[dict]) -> str:
    return ", ".join(f"{rs['metadata']['name']} ({int((rs.get('status') or {}).get('replicas') or 0)}/"
                     f"{int((rs.get('spec') or {}).get('replicas', 1))} replicas created)"
                     for rs in replica_sets) or "<none>"


def describe_deployment(deploy: dict, replica_sets: list[dict], events: list[dict]) -> str:
    """REPLICA_SETS: the Deployment's own; the one whose template equals the
    Deployment's (ignoring the pod-template-hash label) is the new one."""
    meta, spec, status = deploy["metadata"], deploy.get("spec") or {}, deploy.get("status") or {}
    w = _TabWriter()
    _head(w, deploy)
    w.write(0, f"CreationTimestamp:\t{_rfc1123z(meta.get('creationTimestamp'))}\n")
    _labels_multiline(w, "Labels", meta.get("labels"))
    _annotations_multiline(w, "Annotations", meta.get("annotations"))
    w.write(0, f"Selector:\t{selector_string(spec.get('selector'))}\n")
    w.write(0, f"Replicas:\t{int(spec.get('replicas', 1))} desired | {int(status.get('updatedReplicas') or 0)} "
               f"updated | {int(status.get('replicas') or 0)} total | {int(status.get('availableReplicas') or 0)} "
               f"available | {int(status.get('unavailableReplicas') or 0)} unavailable\n")
    strategy = spec.get("strategy") or {}
    w.write(0, f"StrategyType:\t{strategy.get('type', 'RollingUpdate')}\n")
    w.write(0, f"MinReadySeconds:\t{int(spec.get('minReadySeconds') or 0)}\n")
    if strategy.get("type", "RollingUpdate") == "RollingUpdate":
        ru = strategy.get("rollingUpdate") or {}
        w.write(0, f"RollingUpdateStrategy:\t{ru.get('maxUnavailable', '25%')} max unavailable, "
                   f"{ru.get('maxSurge', '25%')} max surge\n")
    _describe_pod_template(w, spec.get("template"))
    _conditions(w, deploy)
    new, old = _split_replica_sets(deploy, replica_sets)
    if new or old:
        w.write(0, f"OldReplicaSets:\t{_replica_sets_text(old)}\n")
        w.write(0, f"NewReplicaSet:\t{_replica_sets_text(new)}\n")
    _describe_events(w, events)
    return w.text()


HASH_LABEL = "pod-template-hash"


def _split_replica_sets(deploy: dict, replica_sets: list[dict]) -> tuple[list[dict], list[dict]]:
    """([new], old): the new ReplicaSet has the Deployment's pod template, apart
    from the pod-template-hash label the controller adds."""
    def template_without_hash(rs: dict) -> dict:
        template = dict((rs.get("spec") or {}).get("template") or {})
        tmeta = dict(template.get("metadata") or {})
        labels = {k: v for k, v in (tmeta.get("labels") or {}).items() if k != HASH_LABEL}
        if labels:
            tmeta["labels"] = labels
        else:
            tmeta.pop("labels", None)
        template["metadata"] = tmeta
        return template

    want = dict((deploy.get("spec") or {}).get("template") or {})
    want["metadata"] = {k: v for k, v in (want.get("metadata") or {}).items() if v}
    new = [rs for rs in replica_sets if template_without_hash(rs) == want][:1]
    old = [rs for rs in replica_sets if rs not in new]
    return new, old


def describe_job(job: dict, events: list[dict]) -> str:
    meta, spec, status = job["metadata"], job.get("spec") or {}, job.get("status") or {}
    w = _TabWriter()
    _head(w, job)
    w.write(0, f"Selector:\t{selector_string(spec.get('selector'))}\n")
    _labels_multiline(w, "Labels", meta.get("labels"))
    _annotations_multiline(w, "Annotations", meta.get("annotations"))
    if _controller_of(job):
        w.write(0, f"Controlled By:\t{_controller_of(job)}\n")
    if spec.get("parallelism") is not None:
        w.write(0, f"Parallelism:\t{spec['parallelism']}\n")
    w.write(0, f"Completions:\t{spec['completions'] if spec.get('completions') is not None else '<unset>'}\n")
    if spec.get("completionMode"):
        w.write(0, f"Completion Mode:\t{spec['completionMode']}\n")
    if spec.get("suspend") is not None:
        w.write(0, f"Suspend:\t{str(bool(spec['suspend'])).lower()}\n")
    if spec.get("backoffLimit") is not None:
        w.write(0, f"Backoff Limit:\t{spec['backoffLimit']}\n")
    if spec.get("ttlSecondsAfterFinished") is not None:
        w.write(0, f"TTL Seconds After Finished:\t{spec['ttlSecondsAfterFinished']}\n")
    start, end = status.get("startTime"), status.get("completionTime")
    if start:
        w.write(0, f"Start Time:\t{_rfc1123z(start)}\n")
    if end:
        w.write(0, f"Completed At:\t{_rfc1123z(end)}\n")
    if start and end:
        w.write(0, f"Duration:\t{job_duration(job)}\n")
    if spec.get("activeDeadlineSeconds") is not None:
        w.write(0, f"Active Deadline Seconds:\t{spec['activeDeadlineSeconds']}s\n")
    active, succeeded, failed = (int(status.get(k) or 0) for k in ("active", "succeeded", "failed"))
    # kubectl shows "(N Ready)" when the Job controller reports status.ready (1.24+);
    # netemu's controller always does.
    ready = f" ({int(status['ready'])} Ready)" if status.get("ready") is not None else ""
    w.write(0, f"Pods Statuses:\t{active} Active{ready} / {succeeded} Succeeded / {failed} Failed\n")
    _describe_pod_template(w, spec.get("template"))
    _describe_events(w, events)
    return w.text()


def describe_daemon_set(ds: dict, pods: list[dict], events: list[dict]) -> str:
    meta, spec, status = ds["metadata"], ds.get("spec") or {}, ds.get("status") or {}
    w = _TabWriter()
    _head(w, ds)
    w.write(0, f"Selector:\t{selector_string(spec.get('selector'))}\n")
    w.write(0, f"Node-Selector:\t{format_labels(_template_spec(ds).get('nodeSelector'))}\n")
    _labels_multiline(w, "Labels", meta.get("labels"))
    _annotations_multiline(w, "Annotations", meta.get("annotations"))
    for title, field in (("Desired Number of Nodes Scheduled", "desiredNumberScheduled"),
                         ("Current Number of Nodes Scheduled", "currentNumberScheduled"),
                         ("Number of Nodes Scheduled with Up-to-date Pods", "updatedNumberScheduled"),
                         ("Number of Nodes Scheduled with Available Pods", "numberAvailable"),
                         ("Number of Nodes Misscheduled", "numberMisscheduled")):
        w.write(0, f"{title}: {int(status.get(field) or 0)}\n")
    w.write(0, f"Pods Status:\t{_pods_status(pods)}\n")
    _describe_pod_template(w, spec.get("template"))
    _describe_events(w, events)
    return w.text()


def describe_endpoints(ep: dict, events: list[dict]) -> str:
    meta = ep["metadata"]
    w = _TabWriter()
    _head(w, ep)
    _labels_multiline(w, "Labels", meta.get("labels"))
    _annotations_multiline(w, "Annotations", meta.get("annotations"))
    w.write(0, "Subsets:\n")
    for ss in ep.get("subsets") or []:
        w.write(1, f"Addresses:\t{','.join(a['ip'] for a in ss.get('addresses') or []) or '<none>'}\n")
        w.write(1, f"NotReadyAddresses:\t"
                   f"{','.join(a['ip'] for a in ss.get('notReadyAddresses') or []) or '<none>'}\n")
        if ss.get("ports"):
            w.write(1, "Ports:\n")
            w.write(2, "Name\tPort\tProtocol\n")
            w.write(2, "----\t----\t--------\n")
            for p in ss["ports"]:
                w.write(2, f"{p.get('name') or '<unset>'}\t{p['port']}\t{p.get('protocol', 'TCP')}\n")
        w.write(0, "\n")
    _describe_events(w, events)
    return w.text()


def _smart_label(field: str) -> str:
    """kubectl's smartLabelFor: involvedObject -> Involved Object, apiVersion ->
    API Version."""
    if not field.replace("-", "").isalpha():
        return field
    words, current = [], ""
    for ch in field:
        if ch.isupper() and current and not current.isupper():
            words.append(current)
            current = ch
        else:
            current += ch
    words.append(current)
    out = []
    for word in words:
        if word.upper() in ("API", "URL", "UID", "GUID"):
            out.append(word.upper())
        elif word.islower():
            out.append(word.title())
        else:
            out.append(word)
    return " ".join(out)


def _unstructured(w: _TabWriter, level: int, content: dict, prefix: str, skip: tuple[str, ...]) -> None:
    for field in sorted(content):
        value, path = content[field], f"{prefix}.{field}"
        if path in skip:
            continue
        if isinstance(value, dict):
            w.write(level, f"{_smart_label(field)}:\n")
            _unstructured(w, level + 1, value, path, skip)
        elif isinstance(value, list):
            w.write(level, f"{_smart_label(field)}:\n")
            for child in value:
                if isinstance(child, dict):
                    _unstructured(w, level + 1, child, path, skip)
                else:
                    w.write(level + 1, f"{child}\n")
        else:
            text = str(value).lower() if isinstance(value, bool) else value
            w.write(level, f"{_smart_label(field)}:\t{text}\n")


def describe_event(ev: dict, events: list[dict]) -> str:
    """Events have no describer of their own in kubectl: its generic describer
    prints every field, with labels derived from the field names."""
    meta = ev["metadata"]
    w = _TabWriter()
    _head(w, ev)
    _labels_multiline(w, "Labels", meta.get("labels"))
    _annotations_multiline(w, "Annotations", meta.get("annotations"))
    _unstructured(w, 0, ev, "", (".metadata.managedFields", ".metadata.name", ".metadata.namespace",
                                  ".metadata.labels", ".metadata.annotations"))
    _describe_events(w, events)
    return w.text()


def describe(kind: str, obj: dict, events: list[dict], store=None) -> str:
    """`kubectl describe KIND NAME`. Raises KeyError for a kind without a describer."""
    ns = obj["metadata"].get("namespace", "default")
    if kind == "Service":
        endpoints = registry.get(store, "Endpoints", ns, obj["metadata"]["name"]) if store is not None else None
        text = describe_service(obj, endpoints, events)
    elif kind == "ReplicationController":
        text = describe_replication_controller(obj, _owned_pods(store, obj), events)
    elif kind == "ReplicaSet":
        text = describe_replica_set(obj, _owned_pods(store, obj), events)
    elif kind == "Deployment":
        replica_sets = [] if store is None else [
            rs for rs in registry.list_(store, "ReplicaSet", ns)
            if any(r.get("controller") and r.get("uid") == obj["metadata"].get("uid")
                   for r in rs["metadata"].get("ownerReferences") or [])]
        text = describe_deployment(obj, replica_sets, events)
    elif kind == "Job":
        text = describe_job(obj, events)
    elif kind == "DaemonSet":
        text = describe_daemon_set(obj, _owned_pods(store, obj), events)
    elif kind == "Endpoints":
        text = describe_endpoints(obj, events)
    elif kind == "Event":
        text = describe_event(obj, events)
    else:
        raise KeyError(kind)
    # cmd_describe print()s the text, which adds the final newline.
    return text.rstrip("\n")


__all__ = ["supports", "tabulate", "describe", "format_endpoints", "external_ip", "port_string",
           "job_status_word", "job_completions", "job_duration", "format_labels"]
