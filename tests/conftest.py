"""Shared test set-up: CUDA tests are skipped on machines without a GPU; hypothesis keeps no local state."""

from __future__ import annotations

from typing import List

import pytest
import torch
from hypothesis import settings

# No example database: a failure found on one machine must not make the next run on the
# same machine differ from a clean clone's. Under CI (hypothesis detects it) examples are
# also derandomised; elsewhere each run draws new ones (`--hypothesis-seed N` replays one).
settings.register_profile("gpipe-bench", parent=settings.default, database=None)
settings.load_profile("gpipe-bench")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
