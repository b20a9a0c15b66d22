"""SVG and text pictures of a cluster and of a trace (pure)."""

import xml.etree.ElementTree as ET

import pytest

from netemu.capture import graph, trace
from netemu.capture.decode import IPHeader
from netemu.capture.trace import Hop, Seen
from tests.unit.test_trace import EPS, SVC, make_view

NS = "{http://www.w3.org/2000/svg}"


def texts(svg: str) -> list[str]:
    root = ET.fromstring(svg.split("\n", 1)[1])   # well-formed XML, or this raises
    return [t.text for t in root.iter(f"{NS}text")]


def test_cluster_svg_shows_nodes_pods_bridges_and_services():
    v = make_view("vxlan", [SVC], [EPS])
    words = " | ".join(texts(graph.cluster_svg(v)))
    for expected in ("node n1", "eth0 172.30.0.1", "pod CIDR 10.244.1.0/24", "flannel.1 (vxlan port 8472)",
                     "docker0 10.244.1.1", "pod a", "10.244.2.2", "client 172.30.0.254",
                     "svc default/web NodePort 10.96.0.10:80/TCP nodePort 30080 -> "
                     "10.244.2.2:8080 (b), 10.244.1.3:8080 (c2)"):
        assert expected in words


def test_cluster_text_lists_pods_under_their_nodes():
    lines = graph.cluster_text(make_view()).splitlines()
    i = lines.index("  node n2: eth0 172.30.0.2, pod CIDR 10.244.2.0/24, flannel0 (udp port 8285), "
                    "docker0 10.244.2.1")
    assert lines[i + 1] == "    pod b 10.244.2.2 (veth vethb)"


def test_svg_escapes_text():
    s = graph.Svg()
    s.text(0, 10, "a < b & c")
    assert "a &lt; b &amp; c" in s.render("t")


def test_trace_svg_has_a_box_per_hop_and_arrows_between_them():
    v = make_view("udp")
    steps = trace.plan_pod_to_pod(v, v.pod("a"), v.pod("b"))
    seen = Seen(1.0, IPHeader("10.244.1.2", "10.244.2.2", "TCP", 5, 80, 64, 60, "S"), tcp_seq=1)
    r = trace.TraceResult("a", trace.resolve_destination(v, "b", 80, "tcp"), "udp", "TCP SYN", "connected",
                          "b", [Hop(s, [seen]) for s in steps], [Hop(s, []) for s in reversed(steps)])
    svg = graph.trace_svg(r)
    root = ET.fromstring(svg.split("\n", 1)[1])
    boxes = [e for e in root.iter(f"{NS}rect")][1:]   # the first is the background
    assert len(boxes) == 2 * len(steps)
    arrows = [e for e in root.iter(f"{NS}line") if e.get("marker-end")]
    assert len(arrows) == 2 * (len(steps) - 1)
    words = texts(svg)
    assert {"pod a", "node n1", "node n2", "pod b"} <= set(words)
    assert words.count("not seen") == len(steps)


def test_pictures_are_written_in_the_format_their_name_says(tmp_path):
    """-o x.png is a PNG (it was SVG text under a .png name); a name that is
    neither .svg nor .png is refused, and nothing is written."""
    from PIL import Image

    v = make_view("vxlan", [SVC], [EPS])
    drawing = graph.cluster_drawing(v)
    graph.write_picture(drawing, str(tmp_path / "c.svg"))
    assert texts((tmp_path / "c.svg").read_text()) == texts(graph.cluster_svg(v))
    graph.write_picture(drawing, str(tmp_path / "c.PNG"))
    data = (tmp_path / "c.PNG").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(tmp_path / "c.PNG") as img:
        # the SVG's size, one pixel per unit, and something drawn on it
        assert abs(img.width - (drawing.width + 20)) <= 1 and abs(img.height - (drawing.height + 20)) <= 1
        assert len(img.convert("L").getcolors(maxcolors=1 << 16)) > 10
    for bad in ("c.jpg", "c", "dir.png/c"):
        with pytest.raises(ValueError, match="must end in .svg or .png"):
            graph.write_picture(drawing, str(tmp_path / bad))
        assert not (tmp_path / bad).exists()
