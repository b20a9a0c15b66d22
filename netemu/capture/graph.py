"""Pictures (SVG written by hand, or PNG drawn with matplotlib) of a cluster and of a trace.

`cluster_svg(view)`: the fabric (underlay bridge) on top with the external client
and the load balancer, one column per node below it (eth0 address, pod CIDR,
backend device, docker0), the node's pods inside it (name, IP), and the services
with their ClusterIP and endpoints at the bottom.

`trace_svg(result)`: one column per place the probe passes (source pod, nodes,
destination pod), one box per hop top to bottom in path order with the headers as
they were there; the reply path follows with dashed arrows.

`cluster_text(view)` is the same layout as text for the terminal. All pure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from xml.sax.saxutils import escape

from netemu import names
from netemu.capture.targets import ClusterView

FONT = "font-family='DejaVu Sans Mono, monospace' font-size='12'"
CHAR_W = 7.3      # width of one character at 12px monospace, near enough for layout
LINE_H = 16


class Svg:
    """A few SVG primitives collected as text, and kept as shapes so that the
    same drawing can be rasterised (to_png) without an SVG renderer."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.shapes: list[tuple] = []
        self.width = 0.0
        self.height = 0.0
        self.title = ""

    def _grow(self, x: float, y: float) -> None:
        self.width, self.height = max(self.width, x), max(self.height, y)

    def rect(self, x, y, w, h, fill="#ffffff", stroke="#333333", dash=False, rx=6) -> None:
        extra = " stroke-dasharray='4 3'" if dash else ""
        self.shapes.append(("rect", x, y, w, h, fill, stroke, dash, rx))
        self.parts.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='{h:.1f}' rx='{rx}' "
                          f"fill='{fill}' stroke='{stroke}'{extra}/>")
        self._grow(x + w, y + h)

    def text(self, x, y, s: str, bold=False, color="#111111", anchor="start") -> None:
        weight = " font-weight='bold'" if bold else ""
        self.shapes.append(("text", x, y, s, bold, color, anchor))
        self.parts.append(f"<text x='{x:.1f}' y='{y:.1f}' {FONT}{weight} fill='{color}' "
                          f"text-anchor='{anchor}'>{escape(s)}</text>")
        self._grow(x + len(s) * CHAR_W, y)

    def line(self, x1, y1, x2, y2, color="#555555", dash=False, arrow=False) -> None:
        extra = (" stroke-dasharray='5 4'" if dash else "") + (" marker-end='url(#arrow)'" if arrow else "")
        self.shapes.append(("line", x1, y1, x2, y2, color, dash, arrow))
        self.parts.append(f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' "
                          f"stroke='{color}' stroke-width='1.5'{extra}/>")
        self._grow(max(x1, x2), max(y1, y2))

    def render(self, title: str, margin: float = 20) -> str:
        w, h = self.width + margin, self.height + margin
        return ("<?xml version='1.0' encoding='UTF-8'?>\n"
                f"<svg xmlns='http://www.w3.org/2000/svg' width='{w:.0f}' height='{h:.0f}' "
                f"viewBox='0 0 {w:.0f} {h:.0f}'>\n<title>{escape(title)}</title>\n"
                "<defs><marker id='arrow' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='7' "
                "markerHeight='7' orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' "
                "fill='#555555'/></marker></defs>\n"
                f"<rect width='100%' height='100%' fill='#fafafa'/>\n"
                + "\n".join(self.parts) + "\n</svg>\n")


    def to_png(self, path: str, margin: float = 20) -> None:
        """Draw the same shapes into a PNG, one pixel per SVG unit (matplotlib's
        Agg renderer: netemu depends on matplotlib already, for bench.png)."""
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

        w, h = self.width + margin, self.height + margin
        dpi = 100
        fig = pyplot.figure(figsize=(w / dpi, h / dpi), dpi=dpi, facecolor="#fafafa")
        try:
            ax = fig.add_axes((0, 0, 1, 1))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)           # SVG's y axis points down
            ax.axis("off")
            points = 72 / dpi           # font sizes and line widths are in points
            for shape in self.shapes:
                if shape[0] == "rect":
                    _, x, y, rw, rh, fill, stroke, dash, rx = shape
                    ax.add_patch(FancyBboxPatch((x, y), rw, rh, boxstyle=f"round,pad=0,rounding_size={rx}",
                                                facecolor=fill, edgecolor=stroke, linewidth=1,
                                                linestyle=(0, (4, 3)) if dash else "solid"))
                elif shape[0] == "text":
                    _, x, y, text, bold, color, anchor = shape
                    ax.text(x, y, text, fontsize=12 * points, family="monospace", color=color,
                            weight="bold" if bold else "normal", va="baseline",
                            ha={"start": "left", "middle": "center", "end": "right"}[anchor])
                else:
                    _, x1, y1, x2, y2, color, dash, arrow = shape
                    ax.add_patch(FancyArrowPatch((x1, y1), (x2, y2), arrowstyle="-|>" if arrow else "-",
                                                 mutation_scale=10, color=color, linewidth=1.5 * points,
                                                 linestyle=(0, (5, 4)) if dash else "solid",
                                                 shrinkA=0, shrinkB=0))
            fig.savefig(path, format="png", dpi=dpi, facecolor="#fafafa",
                        metadata={"Title": self.title} if self.title else None)
        finally:
            pyplot.close(fig)


PICTURE_FORMATS = (".svg", ".png")


def picture_format(path: str) -> str:
    """"svg" or "png", from PATH's name; any other name is refused (ValueError),
    so that a command can check it before doing its work."""
    base = os.path.basename(path)
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    if "." + ext not in PICTURE_FORMATS:
        raise ValueError(f"-o {path}: the picture's name must end in .svg or .png (the format it is written in)")
    return ext


def write_picture(svg: Svg, path: str) -> None:
    """Write a drawing to PATH in the format its name says (.svg or .png)."""
    if picture_format(path) == "png":
        svg.to_png(path)
        return
    with open(path, "w") as f:
        f.write(svg.render(svg.title))


def _text_width(lines: Sequence[str]) -> float:
    return max((len(s) for s in lines), default=0) * CHAR_W + 16


# --- the cluster ------------------------------------------------------------------

def node_lines(view: ClusterView, node) -> list[str]:
    lines = [f"node {node.name}", f"eth0 {node.address}", f"pod CIDR {node.subnet or '?'}"]
    if view.tunnel_device:
        port = f" port {view.backend_port}" if view.backend_port else ""
        lines.append(f"{view.tunnel_device} ({view.backend}{port})")
    else:
        lines.append(f"backend {view.backend} (routes, no tunnel)")
    lines.append(f"{names.NODE_BRIDGE} {node.bridge_ip or '?'}")
    return lines


def service_lines(view: ClusterView) -> list[str]:
    out = []
    for svc in sorted(view.services.values(), key=lambda s: s.key):
        for sp in svc.ports:
            eps = ", ".join(f"{e.ip}:{e.port}" + (f" ({e.pod})" if e.pod else "") for e in sp.endpoints)
            node_port = f" nodePort {sp.node_port}" if sp.node_port else ""
            lbs = f" LB {','.join(svc.load_balancer_ips)}" if svc.load_balancer_ips else ""
            out.append(f"svc {svc.key} {svc.type} {svc.cluster_ip or 'None'}:{sp.port}/{sp.protocol}"
                       f"{node_port}{lbs} -> {eps or 'no endpoints'}")
    return out


def cluster_text(view: ClusterView) -> str:
    lines = [f"cluster {view.name}: backend {view.backend}, pod network {view.network or '?'}",
             f"fabric {view.fabric_ns}: bridge {names.FABRIC_BRIDGE}"]
    if view.client_address:
        lines.append(f"  client {view.client_address}")
    if view.lb_ns:
        lines.append(f"  lb {view.lb_address or '?'}")
    for node in sorted(view.nodes.values(), key=lambda n: n.name):
        nl = node_lines(view, node)
        lines.append("  " + nl[0] + ": " + ", ".join(nl[1:]))
        for pod in sorted((p for p in view.pods.values() if p.node == node.name), key=lambda p: p.key):
            lines.append(f"    pod {pod.key} {pod.ip or '-'} (veth {pod.veth or '?'})")
    for s in service_lines(view):
        lines.append("  " + s)
    return "\n".join(lines)


def cluster_svg(view: ClusterView) -> str:
    return cluster_drawing(view).render(f"cluster {view.name}")


def cluster_drawing(view: ClusterView) -> Svg:
    svg = Svg()
    x0, y0 = 20, 20
    nodes = sorted(view.nodes.values(), key=lambda n: n.name)
    columns = []
    for node in nodes:
        pods = sorted((p for p in view.pods.values() if p.node == node.name), key=lambda p: p.key)
        head = node_lines(view, node)
        pod_texts = [[f"pod {p.key}", f"{p.ip or '-'}", f"veth {p.veth or '?'}"] for p in pods]
        width = max([_text_width(head)] + [_text_width(t) + 20 for t in pod_texts] + [180])
        columns.append((node, head, pod_texts, width))
    total = sum(c[3] for c in columns) + 30 * max(len(columns) - 1, 0)
    outside = [s for s in (f"client {view.client_address}" if view.client_address else None,
                           f"lb {view.lb_address}" if view.lb_ns else None) if s]
    fabric_w = max(total, _text_width([f"fabric {names.FABRIC_BRIDGE}"]) + 20)
    svg.rect(x0, y0, fabric_w, 34, fill="#e8eef8")
    svg.text(x0 + 8, y0 + 22, f"fabric: bridge {names.FABRIC_BRIDGE} (underlay)", bold=True)
    ox = x0 + fabric_w + 30
    for s in outside:
        w = _text_width([s])
        svg.rect(ox, y0, w, 34, fill="#f3e8f8")
        svg.text(ox + 8, y0 + 22, s)
        svg.line(ox, y0 + 17, x0 + fabric_w, y0 + 17)
        ox += w + 20
    x, top = x0, y0 + 34 + 40
    for node, head, pod_texts, width in columns:
        y = top + 8
        inner = []
        for i, s in enumerate(head):
            inner.append((x + 8, y + LINE_H * (i + 1), s, i == 0))
        y += LINE_H * len(head) + 12
        pod_boxes = []
        for t in pod_texts:
            h = LINE_H * len(t) + 10
            pod_boxes.append((x + 10, y, width - 20, h, t))
            y += h + 10
        height = y - top + 4
        svg.rect(x, top, width, height, fill="#eef7ee")
        for (tx, ty, s, bold) in inner:
            svg.text(tx, ty, s, bold=bold)
        svg.line(x + width / 2, top, x + width / 2, y0 + 34, arrow=False)
        for (bx, by, bw, bh, t) in pod_boxes:
            svg.rect(bx, by, bw, bh, fill="#ffffff")
            for i, s in enumerate(t):
                svg.text(bx + 8, by + LINE_H * (i + 1), s, bold=i == 0)
        x += width + 30
    services = service_lines(view)
    if services:
        y = svg.height + 30
        h = LINE_H * (len(services) + 1) + 10
        svg.rect(x0, y, max(_text_width(services), 200), h, fill="#fff7e6")
        svg.text(x0 + 8, y + LINE_H, "services (ClusterIP -> endpoints)", bold=True)
        for i, s in enumerate(services):
            svg.text(x0 + 8, y + LINE_H * (i + 2), s)
    svg.title = f"cluster {view.name}"
    return svg


# --- a trace -----------------------------------------------------------------------

def _hop_lines(hop) -> list[str]:
    lines = [hop.step.point.iface]
    if not hop.seen:
        return lines + ["not seen"]
    s = hop.seen[0]
    h = s.inner

    def ep(a, p):
        return a if p is None else f"{a}:{p}"

    if s.outer is not None:
        tag = "udp" if s.encapsulation == "udp" else f"vxlan {s.vni}"
        lines.append(f"[{tag}] {ep(s.outer.src, s.outer.sport)} > {ep(s.outer.dst, s.outer.dport)}")
    lines.append(f"{ep(h.src, h.sport)} >")
    lines.append(f"  {ep(h.dst, h.dport)} {h.proto} ttl {h.ttl}")
    return lines


def trace_svg(result) -> str:
    drawing = trace_drawing(result)
    return drawing.render(drawing.title)


def trace_drawing(result) -> Svg:
    """SVG of a TraceResult (netemu.capture.trace)."""
    svg = Svg()
    hops = list(result.forward) + list(result.reply)
    wheres: list[str] = []
    for h in hops:
        if h.step.where not in wheres:
            wheres.append(h.step.where)
    col_w = max([_text_width(_hop_lines(h)) for h in hops] + [_text_width(wheres), 160])
    x0, y0 = 20, 20
    d = result.destination
    svg.text(x0, y0 + 12, f"trace {result.source} -> {d.description} ({d.proto.upper()}"
             f"{':' + str(d.port) if d.port else ''}), backend {result.backend}", bold=True)
    svg.text(x0, y0 + 12 + LINE_H, f"{result.probe}; {result.outcome}")
    y = y0 + 12 + LINE_H * 2
    for line in result.rules:
        svg.text(x0, y, line[:160])
        y += LINE_H
    col_x = {w: x0 + i * (col_w + 40) for i, w in enumerate(wheres)}
    for w, cx in col_x.items():
        svg.text(cx + col_w / 2, y + 20, w, bold=True, anchor="middle")
    y += 34
    for section, hs, dash in (("probe", result.forward, False), ("reply", result.reply, True)):
        svg.text(x0, y + 12, section, bold=True, color="#1f4e99" if not dash else "#99401f")
        y += 22
        prev = None
        for h in hs:
            lines = _hop_lines(h)
            bh = LINE_H * len(lines) + 8
            bx = col_x[h.step.where]
            fill = "#ffffff" if h.seen else "#f0f0f0"
            fill = "#e6eefc" if h.seen and h.seen[0].outer is not None else fill
            svg.rect(bx, y, col_w, bh, fill=fill, dash=not h.seen)
            for i, s in enumerate(lines):
                svg.text(bx + 8, y + LINE_H * (i + 1), s, bold=i == 0,
                         color="#111111" if h.seen else "#888888")
            if prev is not None:
                px, py = prev
                svg.line(px, py, bx + col_w / 2, y, dash=dash, arrow=True)
            prev = (bx + col_w / 2, y + bh)
            y += bh + 14
        y += 10
    svg.title = f"trace {result.source} -> {d.description}"
    return svg
