"""The predictor's tests do not depend on how fast this machine's host is today.

Host time per operator is measured where a prediction runs (gpipe_bench/predict/host.py);
here it is pinned to nothing beyond each preset's kernel launch, so every expected
figure is arithmetic on the presets the tests build. tests/predict/test_host.py
measures for real.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from gpipe_bench.predict import costs
from gpipe_bench.predict.host import HostCosts

PINNED = HostCosts(forward=0.0, nograd=0.0, backward=0.0, cell_forward=0.0, cell_backward=0.0, peer=(0.0, 0.0))


@pytest.fixture(autouse=True)
def pinned_host(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.module.__name__.endswith("test_host"):
        yield
        return
    monkeypatch.setattr(costs, "measure", lambda *args, **kwargs: PINNED)
    yield
