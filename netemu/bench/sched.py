"""The scheduler's view of a round trip: what each process carrying it spends
(pure logic of tools/latency_sched.py; no processes, tested without root).

A packet through the udp backend is carried by a chain of processes, each
woken by the previous one: the client pod, node1's tx worker, node2's rx
worker, the server pod, node2's tx worker, node1's rx worker, the client
again (host-gw: the client and the server only; the kernel forwards in their
system calls). `perf sched timehist` prints one line each time a task leaves
a CPU: how long it had slept (wait), how long it waited between its wake-up
and getting the CPU (sch delay: the waker finishing its system call, a
preempted task, an idle vCPU to wake), and how long it then ran before
leaving the CPU again (run: its system calls, and in them the kernel's
forwarding of the packet up to the next process's wake-up).
"""

from __future__ import annotations

import dataclasses
import re

from netemu.bench.report import percentile


@dataclasses.dataclass
class Slice:
    """One line of `perf sched timehist`: TID ran on CPU until TIME (s)."""
    time: float
    cpu: int
    comm: str
    tid: int
    wait_ms: float
    delay_ms: float
    run_ms: float


# "   75704.281422 [0000]  fastudp-worker[8319]    0.000   0.005   0.020"
# (the task may be "comm[tid/pid]", and its comm may hold spaces: "Trio thread 2[9488]")
_LINE = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.+?)\[(\d+)(?:/\d+)?\]\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s*$")


def parse_timehist(text: str) -> list[Slice]:
    """The task lines of `perf sched timehist`'s output (headers and others skipped)."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            t, cpu, comm, tid, wait, delay, run = m.groups()
            out.append(Slice(float(t), int(cpu), comm, int(tid), float(wait), float(delay), float(run)))
    return out


def summarize(slices: list[Slice], roles: dict[str, int]) -> list[dict]:
    """Per role (label -> tid, in the order given): wake-ups per second (of
    the recording's span, first to last slice), sch delay and run time in µs
    (p50, p90, p99), and the share of its slices on each CPU. Only slices
    after a sleep count (wait > 0: a wake-up, not a preemption's return); a
    role with none is reported with n = 0."""
    seconds = max(s.time for s in slices) - min(s.time for s in slices) if slices else 0.0
    rows = []
    for label, tid in roles.items():
        mine = [s for s in slices if s.tid == tid and s.wait_ms > 0]
        row: dict = {"role": label, "tid": tid, "n": len(mine), "per_s": len(mine) / seconds if seconds else 0.0}
        if mine:
            for key, values in (("delay_us", [s.delay_ms * 1000 for s in mine]),
                                ("run_us", [s.run_ms * 1000 for s in mine])):
                row[key] = {q: percentile(values, q) for q in (50, 90, 99)}
            cpus = sorted({s.cpu for s in mine})
            row["cpu_share"] = {c: sum(s.cpu == c for s in mine) / len(mine) for c in cpus}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """summarize's rows as text, one line per role."""
    lines = [f"  {'process':22s} {'wakes/s':>8s}   {'sch delay p50/p90/p99 (us)':>27s}   "
             f"{'run p50/p90/p99 (us)':>22s}   cpu share"]
    for r in rows:
        if not r["n"]:
            lines.append(f"  {r['role']:22s} {0:8.0f}   (never woken)")
            continue
        d, u = r["delay_us"], r["run_us"]
        share = " ".join(f"cpu{c} {v:.0%}" for c, v in r["cpu_share"].items())
        lines.append(f"  {r['role']:22s} {r['per_s']:8.0f}   {d[50]:8.1f} {d[90]:8.1f} {d[99]:8.1f}   "
                     f"{u[50]:6.1f} {u[90]:6.1f} {u[99]:7.1f}   {share}")
    return "\n".join(lines)
