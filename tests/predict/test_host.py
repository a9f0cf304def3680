"""host.py: the host's time per operator and per cell of our engine, measured on this machine."""

from __future__ import annotations

import pytest

from gpipe_bench.errors import HarnessError
from gpipe_bench.predict import host


def test_the_host_is_measured_per_operator_and_per_cell() -> None:
    measured = host.measure(samples=10)
    # Eager PyTorch costs microseconds per operator on any host, and never nothing.
    assert 1e-7 < measured.nograd and 1e-7 < measured.forward < 1e-3 and 1e-7 < measured.backward < 1e-3
    assert measured.cell_forward >= 0 and measured.cell_backward >= 0
    assert host.measure(samples=10) is measured  # once per process


def test_a_faster_host_divides_every_host_cost() -> None:
    costs = host.HostCosts(forward=4e-6, nograd=2e-6, backward=8e-6, cell_forward=1e-4, cell_backward=2e-4)
    fast = costs.scaled(2.0)
    assert fast.per_operator("forward") == pytest.approx(2e-6) and fast.per_operator("backward") == pytest.approx(4e-6)
    assert fast.per_cell() == (pytest.approx(5e-5), pytest.approx(1e-4))
    assert "2x as fast per core" in fast.describe() and "this host" in costs.describe()


def test_torchgpipes_cost_per_cell_is_its_own_where_it_is_installed() -> None:
    costs = host.HostCosts(1e-6, 1e-6, 1e-6, 1e-4, 2e-4, peer=(3e-4, 4e-4))
    assert costs.per_cell("torchgpipe") == (3e-4, 4e-4) and costs.per_cell("gpipe-bench") == (1e-4, 2e-4)
    missing = host.HostCosts(1e-6, 1e-6, 1e-6, 1e-4, 2e-4)
    with pytest.raises(HarnessError, match=r"pip install -e '\.\[peers\]'"):
        missing.per_cell("torchgpipe")
    # torchgpipe 0.0.7 is installed with the test extras: it is replayed beside our engine
    assert host.measure(samples=10).peer is not None
