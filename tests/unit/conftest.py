"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from netemu.overlay import vnet


# The udp fast path's per-byte work, once with the compiled helper and once with
# the numpy code it falls back to: both must behave alike.
@pytest.fixture(params=["compiled", "numpy"])
def implementation(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(vnet, "native", None)
    elif not vnet.COMPILED:
        pytest.skip("netemu.overlay._vnetc was not built (no C compiler at install)")
    return request.param
