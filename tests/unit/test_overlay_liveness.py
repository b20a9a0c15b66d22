"""The pure parts of item 8 (worker heartbeats) and item 12 (overlay counters
that survive a restart) of issue 12: fastudp.stalled and the daemon's
carried_counters / add_counters."""

from __future__ import annotations

import os

from netemu.overlay import fastudp
from netemu.overlay.daemon import add_counters, carried_counters


def test_an_idle_worker_is_never_stalled():
    """Nothing waiting for it: a heartbeat that has not moved is no sign."""
    assert not fastudp.stalled(7, 7, waiting=False, slept=2.0, asked=2.0)
    assert not fastudp.stalled(0, 0, waiting=False, slept=15.0, asked=15.0)


def test_a_worker_whose_heartbeat_stands_while_work_waits_is_stalled():
    assert fastudp.stalled(7, 7, waiting=True, slept=2.01, asked=2.0)
    assert not fastudp.stalled(7, 8, waiting=True, slept=2.01, asked=2.0)       # it moved: busy, alive


def test_a_watcher_that_was_away_blames_no_one():
    """The daemon not scheduled for far longer than it asked (a loaded
    machine) is no proof the worker stopped."""
    assert not fastudp.stalled(7, 7, waiting=True, slept=5.0, asked=2.0)


def test_heartbeats_live_after_the_counters_in_the_shared_memory():
    fd = fastudp.counters_memory()
    try:
        os.pwrite(fd, (7).to_bytes(8, "little"), fastudp.HEARTBEATS + 8)
        assert fastudp.read_heartbeat(fd, "rx") == 7 and fastudp.read_heartbeat(fd, "tx") == 0
        assert all(v == 0 for v in fastudp.read_counters(fd).values())
        fastudp.reset_heartbeat(fd, "rx")
        assert fastudp.read_heartbeat(fd, "rx") == 0
    finally:
        os.close(fd)


def test_counters_are_carried_over_but_gauges_are_not():
    previous = {"backend": "vxlan", "counters": {"drop_unknown_source": 40, "peers": 2, "peers_ignored": 1}}
    base = carried_counters(previous, "vxlan", frozenset({"peers", "peers_ignored"}))
    assert base == {"drop_unknown_source": 40}
    now = add_counters(base, {"drop_unknown_source": 3, "peers": 2, "peers_ignored": 0},
                       frozenset({"peers", "peers_ignored"}))
    assert now == {"drop_unknown_source": 43, "peers": 2, "peers_ignored": 0}


def test_counters_of_another_backend_or_nonsense_are_not_carried():
    assert carried_counters(None, "udp", frozenset()) == {}
    assert carried_counters({"backend": "vxlan", "counters": {"x": 1}}, "udp", frozenset()) == {}
    assert carried_counters({"backend": "udp", "counters": [1]}, "udp", frozenset()) == {}
    odd = {"backend": "udp", "counters": {"a": "7", "b": -1, "c": True, "d": 5}}
    assert carried_counters(odd, "udp", frozenset()) == {"d": 5}


def test_a_restart_keeps_counting_up():
    """Published figures of three daemon lives: each new one starts where the
    last one's file left off."""
    published = None
    for life in range(3):
        base = carried_counters(published, "udp", frozenset())
        published = {"backend": "udp", "counters": add_counters(base, {"rx_packets": 10}, frozenset())}
    assert published["counters"]["rx_packets"] == 30
