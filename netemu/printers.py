"""kubectl's output formats: tables with its column names, describe, -o json|yaml."""

from __future__ import annotations

import datetime
import json

import yaml

from netemu.store import registry


def age(stamp: str | None, now: datetime.datetime | None = None) -> str:
    """kubectl's short human duration: 45s, 3m12s, 5h, 2d."""
    t = registry.parse_time(stamp)
    if t is None:
        return "<unknown>"
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return duration((now - t).total_seconds())


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 48:
        return f"{h}h"
    return f"{h // 24}d"


def api_time(stamp: str | None) -> str:
    """An API timestamp as kubectl's describe shows every one of them: Go's
    time.RFC1123Z (`Mon, 02 Jan 2006 15:04:05 -0700`) in the local time zone.
    One function for every kind, so pods, nodes and jobs read alike."""
    t = registry.parse_time(stamp)
    if t is None:
        return ""
    return t.astimezone().strftime("%a, %d %b %Y %H:%M:%S %z")


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(str(cell)))
    lines = []
    for row in [headers] + rows:
        lines.append("   ".join(str(c).ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return "\n".join(lines)


def dump(objs: list[dict], fmt: str, single: bool) -> str:
    # metadata.managedFields is left out, as kubectl leaves it out of -o
    # json|yaml (unless --show-managed-fields, which netemu's verbs lack).
    objs = [{**o, "metadata": {k: v for k, v in o["metadata"].items() if k != "managedFields"}}
            if isinstance(o.get("metadata"), dict) and "managedFields" in o["metadata"] else o for o in objs]
    if single and len(objs) == 1:
        data = objs[0]
    else:
        data = {"apiVersion": "v1", "kind": "List", "items": objs, "metadata": {"resourceVersion": ""}}
    if fmt == "json":
        return json.dumps(data, indent=4)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()


# -- pods ----------------------------------------------------------------------

def pod_status_word(pod: dict) -> str:
    """STATUS as kubectl prints it."""
    meta, status = pod["metadata"], pod.get("status", {})
    if meta.get("deletionTimestamp"):
        return "Terminating"
    phase = status.get("phase", "Pending")
    reason = None
    for c in status.get("containerStatuses", []):
        state = c.get("state", {})
        if "waiting" in state and state["waiting"].get("reason") not in (None, "ContainerCreating"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state and phase not in ("Succeeded",) and reason is None:
            reason = state["terminated"].get("reason")
    if phase == "Succeeded":
        return "Completed"
    if reason:
        return reason
    if phase == "Pending" and pod.get("spec", {}).get("nodeName") and status.get("containerStatuses"):
        return "ContainerCreating"
    if phase == "Pending" and pod.get("spec", {}).get("nodeName"):
        return "ContainerCreating"
    return phase


def pod_row(pod: dict, wide: bool) -> list[str]:
    spec, status = pod.get("spec", {}), pod.get("status", {})
    containers = spec.get("containers", [])
    statuses = status.get("containerStatuses", [])
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(c.get("restartCount", 0) for c in statuses)
    row = [pod["metadata"]["name"], f"{ready}/{len(containers)}", pod_status_word(pod), str(restarts),
           age(pod["metadata"].get("creationTimestamp"))]
    if wide:
        row += [status.get("podIP", "<none>"), spec.get("nodeName", "<none>"), "<none>", "<none>"]
    return row


POD_HEADERS = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
POD_WIDE = ["IP", "NODE", "NOMINATED NODE", "READINESS GATES"]


def node_row(node: dict, wide: bool) -> list[str]:
    meta, spec, status = node["metadata"], node.get("spec", {}), node.get("status", {})
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    word = "Ready" if ready else "NotReady"
    if spec.get("unschedulable"):
        word += ",SchedulingDisabled"
    roles = sorted(k.split("/", 1)[1] for k in meta.get("labels", {})
                   if k.startswith("node-role.kubernetes.io/")) or ["<none>"]
    row = [meta["name"], word, ",".join(roles), age(meta.get("creationTimestamp")), "netemu"]
    if wide:
        addr = next((a["address"] for a in status.get("addresses", []) if a["type"] == "InternalIP"), "")
        # The backend as the node's overlay daemon annotated it (flannel's key).
        backend = (meta.get("annotations") or {}).get("flannel.alpha.coreos.com/backend-type") or "<none>"
        row += [addr, spec.get("podCIDR", "<none>"), backend]
    return row


NODE_HEADERS = ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
NODE_WIDE = ["INTERNAL-IP", "POD-CIDR", "BACKEND"]


def labels_text(labels: dict | None, indent: str) -> str:
    if not labels:
        return "<none>"
    items = [f"{k}={v}" for k, v in sorted(labels.items())]
    return ("\n" + indent).join(items)


def annotations_text(annotations: dict | None, indent: str) -> str:
    """kubectl's Annotations field: `key: value` per line, `<none>` when there
    are none (the last-applied-configuration annotation is never shown)."""
    items = [f"{k}: {v}" for k, v in sorted((annotations or {}).items())
             if k != "kubectl.kubernetes.io/last-applied-configuration"]
    return ("\n" + indent).join(items) if items else "<none>"


def describe_pod(pod: dict, events: list[dict], sandbox: dict | None) -> str:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    host_ip = status.get("hostIP", "")
    out = [f"Name:             {meta['name']}",
           f"Namespace:        {meta.get('namespace', 'default')}",
           f"Node:             {spec.get('nodeName', '<none>')}{'/' + host_ip if host_ip else ''}",
           f"Start Time:       {api_time(status.get('startTime')) or '<unset>'}",
           f"Labels:           {labels_text(meta.get('labels'), ' ' * 18)}",
           f"Annotations:      {annotations_text(meta.get('annotations'), ' ' * 18)}",
           f"Status:           {pod_status_word(pod) if meta.get('deletionTimestamp') else status.get('phase', 'Pending')}",
           f"IP:               {status.get('podIP', '')}"]
    owners = meta.get("ownerReferences") or []
    out.append(f"Controlled By:    {owners[0]['kind']}/{owners[0]['name']}" if owners else
               "Controlled By:    <none>")
    if sandbox:
        out += ["Sandbox:",
                f"  Network Namespace:  {sandbox['namespace']}  (ip netns exec {sandbox['namespace']} ...)",
                f"  Pause PID:          {sandbox['pause_pid']}",
                f"  Interface:          eth0 {sandbox['ip']}/{sandbox['prefixlen']} mtu {sandbox['mtu']} "
                f"(peer {sandbox['veth']} on docker0)",
                f"  Gateway:            {sandbox['gateway']}"]
    out.append("Containers:")
    by_name = {c["name"]: c for c in status.get("containerStatuses", [])}
    for c in spec.get("containers", []):
        st = by_name.get(c["name"], {})
        ports = ", ".join(f"{p['containerPort']}/{p.get('protocol', 'TCP')}" for p in c.get("ports") or [])
        host_ports = ", ".join(f"{p['hostPort']}/{p.get('protocol', 'TCP')}" for p in c.get("ports") or []
                               if p.get("hostPort"))
        out += [f"  {c['name']}:",
                f"    Container ID:   {st.get('containerID', '')}",
                f"    Image:          {c.get('image', '')}",
                f"    Port:           {ports or '<none>'}",
                f"    Host Port:      {host_ports or '<none>'}"]
        if c.get("command"):
            out.append(f"    Command:        {' '.join(c['command'])}")
        if c.get("args"):
            out.append(f"    Args:           {' '.join(str(a) for a in c['args'])}")
        out += _state_lines("State", st.get("state", {}))
        if st.get("lastState"):
            out += _state_lines("Last State", st["lastState"])
        out += [f"    Ready:          {st.get('ready', False)}",
                f"    Restart Count:  {st.get('restartCount', 0)}"]
    out.append("Conditions:\n  Type              Status")
    for cond in status.get("conditions", []):
        out.append(f"  {cond['type']:<17} {cond['status']}")
    out.append(format_events(events))
    return "\n".join(out)


def _state_lines(title: str, state: dict) -> list[str]:
    if "running" in state:
        return [f"    {title + ':':<16}Running", f"      Started:      {api_time(state['running'].get('startedAt'))}"]
    if "terminated" in state:
        t = state["terminated"]
        return [f"    {title + ':':<16}Terminated", f"      Reason:       {t.get('reason', '')}",
                f"      Exit Code:    {t.get('exitCode')}", f"      Started:      {api_time(t.get('startedAt'))}",
                f"      Finished:     {api_time(t.get('finishedAt'))}"]
    if "waiting" in state:
        return [f"    {title + ':':<16}Waiting", f"      Reason:       {state['waiting'].get('reason', '')}"]
    return [f"    {title + ':':<16}<none>"]


def format_events(events: list[dict]) -> str:
    if not events:
        return "Events:            <none>"
    rows = []
    for e in events:
        first, last = age(e.get("firstTimestamp")), age(e.get("lastTimestamp"))
        when = last if e.get("count", 1) == 1 else f"{last} (x{e['count']} over {first})"
        rows.append(["  " + e.get("type", "Normal"), e.get("reason", ""), when,
                     e.get("source", {}).get("component", ""), e.get("message", "")])
    return "Events:\n" + table(["  Type", "Reason", "Age", "From", "Message"],
                               [["  ----", "------", "----", "----", "-------"]] + rows)


def describe_node(node: dict, pods: list[dict], overlay: dict | None, events: list[dict]) -> str:
    meta, spec, status = node["metadata"], node.get("spec", {}), node.get("status", {})
    out = [f"Name:               {meta['name']}",
           f"Labels:             {labels_text(meta.get('labels'), ' ' * 20)}",
           f"CreationTimestamp:  {api_time(meta.get('creationTimestamp'))}",
           f"Unschedulable:      {str(bool(spec.get('unschedulable'))).lower()}",
           "Conditions:"]
    for c in status.get("conditions", []):
        out.append(f"  {c['type']:<10} {c['status']:<6} {c.get('reason', '')}  {c.get('message', '')}")
    out.append("Addresses:")
    for a in status.get("addresses", []):
        out.append(f"  {a['type']}:  {a['address']}")
    out.append(f"PodCIDR:            {spec.get('podCIDR', '<none>')}")
    if overlay:
        out.append(f"Overlay:            backend {overlay.get('backend')}, lease {overlay.get('subnet')}")
        if overlay.get("data_path"):
            out.append(f"  data path: {overlay['data_path']}")
        for subnet, ip in overlay.get("peers", {}).items():
            out.append(f"  peer {subnet} via {ip}")
        counters = overlay.get("counters") or {}
        if counters:
            out.append("  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    out.append(f"Non-terminated Pods: ({len(pods)} in total)")
    if pods:
        out.append(table(["  Namespace", "Name", "IP"],
                         [["  " + p["metadata"].get("namespace", "default"), p["metadata"]["name"],
                           p.get("status", {}).get("podIP", "")] for p in pods]))
    out.append(format_events(events))
    return "\n".join(out)
