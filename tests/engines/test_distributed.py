"""engines/distributed.py: the checks that need no processes."""

from __future__ import annotations

import pytest
import torch

from gpipe_bench.engines.distributed import rank_device
from gpipe_bench.errors import HarnessError


def test_more_local_ranks_than_gpus_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(HarnessError, match="local rank 3 has no GPU: this host has 2; launch at most --nproc 2"):
        rank_device()


def test_without_cuda_every_rank_is_a_cpu_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert rank_device() == torch.device("cpu")
