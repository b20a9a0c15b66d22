"""up's warning about the machine's neighbour table (issue 14): pods need no
dynamic entries, the underlay may; the limit is read, never changed."""

from netemu import cluster as clusters


def test_pods_add_no_dynamic_entries_nodes_do():
    assert clusters.neighbour_entries(2) == 10
    assert clusters.neighbour_entries(100) == 100 * 101 + 200


def test_warning_names_the_sysctl_and_a_value_that_fits(tmp_path):
    limit = tmp_path / "gc_thresh3"
    limit.write_text("1024\n")
    assert clusters.neighbour_table_warning(20, str(limit)) is None          # 460 entries
    text = clusters.neighbour_table_warning(100, str(limit))
    assert "net.ipv4.neigh.default.gc_thresh3 = 1024" in text
    assert "sysctl -w net.ipv4.neigh.default.gc_thresh3=12288" in text      # 10300 + 1024, rounded up to 1024s
    assert "\n" not in text
    assert clusters.neighbour_table_warning(100, str(tmp_path / "missing")) is None
