"""The pure parts of item 8 (worker heartbeats) and item 12 (overlay counters
that survive a restart) of issue 12: fastudp.Watchdog and the daemon's
carried_counters / add_counters."""

from __future__ import annotations

import os

from netemu.overlay import fastudp
from netemu.overlay.daemon import add_counters, carried_counters


def test_an_idle_worker_that_beats_is_never_hung():
    watch = fastudp.Watchdog(0.0, timeout=2.0, grace=15.0)
    beats = 0
    for step in range(1, 200):                      # 20 s, looked at every 0.1 s, a beat every 0.2 s
        now = step * 0.1
        if step % 2 == 0:
            beats += 1
        assert not watch.hung(beats, now)


def test_a_stopped_worker_is_hung_after_the_timeout():
    watch = fastudp.Watchdog(0.0, timeout=2.0)
    assert not watch.hung(5, 0.25)
    assert not watch.hung(5, 2.0)
    assert not watch.hung(5, 2.25)                  # 2.0 s since the last change
    assert watch.hung(5, 2.5)


def test_a_starting_worker_gets_the_grace_period():
    watch = fastudp.Watchdog(0.0, timeout=2.0, grace=15.0)
    for step in range(1, 60):
        assert not watch.hung(0, step * 0.25)       # 14.75 s without a first beat
    assert watch.hung(0, 15.25)


def test_a_watcher_that_was_away_blames_no_one():
    """The daemon not scheduled for 5 s (a loaded machine) is no proof the
    worker stopped: it starts counting again."""
    watch = fastudp.Watchdog(0.0, timeout=2.0)
    assert not watch.hung(3, 0.25)
    assert not watch.hung(3, 5.25)
    assert not watch.hung(3, 6.5)
    assert watch.hung(3, 7.5)


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
