"""controllers.loop: a controller that asks for IDLE_RESYNC sleeps until a
change after a clean pass, but a pass with a failed step is retried at the
ordinary resync."""

import trio

from netemu.controllers.loop import guarded, run_reconciler


class QuietStore:
    def revision(self) -> int:
        return 1

    async def watch(self, prefix, since):
        await trio.sleep_forever()
        yield  # pragma: no cover


def passes(fail: bool, idle_resync) -> int:
    calls = []

    def sync():
        calls.append(1)
        if fail:
            guarded("x", lambda: 1 / 0)()
        return None

    async def main():
        with trio.move_on_after(0.6):
            await run_reconciler(QuietStore(), "t", ["/a/b/"], sync, resync=0.05, idle_resync=idle_resync)

    trio.run(main)
    return len(calls)


def test_an_idle_controller_sleeps_until_a_change():
    assert passes(fail=False, idle_resync=30.0) == 1


def test_without_idle_resync_or_after_a_failure_it_resyncs_as_before():
    assert passes(fail=False, idle_resync=None) >= 5
    assert passes(fail=True, idle_resync=30.0) >= 5
