"""netemu.supervisor's stop(): a supervised child is stopped at once, whether
it runs in a session of its own or in ours (real processes, no root)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import trio

from netemu.supervisor import stop

# A child that exits 0 on SIGTERM (the default action would do as well, but
# this proves the signal was delivered rather than the SIGKILL fallback).
CHILD = [sys.executable, "-c",
         "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
         "print('ready', flush=True); time.sleep(60)"]


@pytest.mark.parametrize("new_session", [True, False])
def test_stop_ends_the_child_with_sigterm_within_its_grace(new_session):
    async def main():
        proc = await trio.lowlevel.open_process(CHILD, stdout=subprocess.PIPE, start_new_session=new_session)
        seen = b""
        while not seen.endswith(b"\n"):        # its handler is set: SIGTERM is caught
            seen += await proc.stdout.receive_some(16)
        assert seen == b"ready\n"
        started = time.monotonic()
        await stop(proc, grace=3.0)
        return proc.returncode, time.monotonic() - started

    code, took = trio.run(main)
    assert code == 0, code          # its own SIGTERM handler, not the SIGKILL fallback
    assert took < 1.0, took


def test_stop_of_a_child_that_is_gone_returns_at_once():
    async def main():
        proc = await trio.lowlevel.open_process([sys.executable, "-c", "pass"], start_new_session=False)
        await proc.wait()
        started = time.monotonic()
        await stop(proc)
        return time.monotonic() - started

    assert trio.run(main) < 0.5
