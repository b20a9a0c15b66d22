"""netemu.bench.sched: `perf sched timehist` lines into per-process wake-up costs."""

from __future__ import annotations

import pytest

from netemu.bench import sched

TIMEHIST = """\
           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
   75704.281347 [0000]  perf[9634]                          0.000      0.000      0.000
   75704.281368 [0000]  fastudp-worker[8318]                0.090      0.006      0.014
   75704.281400 [0001]  fastudp-worker[8318]                0.080      0.004      0.016
   75704.281422 [0000]  fastudp-worker[8318]                0.000      0.005      0.020
   75704.281500 [0000]  Trio thread 2[9488/9400]            0.252      0.010      1.140
   75704.281600 [0000]  python[9626]                        0.075      0.006      0.029
"""


def test_task_lines_are_parsed_and_headers_skipped():
    slices = sched.parse_timehist(TIMEHIST)
    assert [(s.comm, s.tid, s.cpu) for s in slices] == [
        ("perf", 9634, 0), ("fastudp-worker", 8318, 0), ("fastudp-worker", 8318, 1), ("fastudp-worker", 8318, 0),
        ("Trio thread 2", 9488, 0), ("python", 9626, 0)]
    assert slices[1].delay_ms == 0.006 and slices[1].run_ms == 0.014 and slices[1].time == 75704.281368


def test_summary_counts_wake_ups_only_in_the_order_given():
    rows = sched.summarize(sched.parse_timehist(TIMEHIST), {"client": 9626, "tx": 8318, "gone": 1})
    assert [r["role"] for r in rows] == ["client", "tx", "gone"]
    tx = rows[1]
    # the third slice of 8318 returns from a preemption (wait 0): not a wake-up
    assert tx["n"] == 2 and tx["per_s"] == pytest.approx(2 / 0.000253)     # over the span of all slices
    assert tx["delay_us"][50] == 4.0 and tx["delay_us"][99] == 6.0
    assert tx["run_us"][50] == 14.0 and tx["cpu_share"] == {0: 0.5, 1: 0.5}
    assert rows[2]["n"] == 0 and "delay_us" not in rows[2]
    text = sched.table(rows)
    assert "never woken" in text.splitlines()[3] and "cpu0 50% cpu1 50%" in text
