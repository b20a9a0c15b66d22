"""The node agent's restart back-off for its parts (pure)."""

from netemu.node.agent import Backoff, describe


def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run():
    b = Backoff(start=1, most=30, stable_after=60)
    assert [b.failed(0.1) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.failed(61) == 1          # it ran a minute: back to the start
    assert b.failed(0.1) == 2


def test_describe_unwraps_single_exception_groups():
    e = ExceptionGroup("x", [ExceptionGroup("y", [RuntimeError("giving up\nmore")])])
    assert describe(e) == "RuntimeError: giving up"
    assert describe(ExceptionGroup("two", [ValueError(1), KeyError(2)])).startswith("ExceptionGroup")
