"""engines/distributed.py: the checks that need no processes, and the process group's lifecycle in one."""

from __future__ import annotations

import atexit
import socket
from typing import Any, Callable, Iterator, List

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from gpipe_bench.engines import distributed
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


# -- the process group's lifecycle: one process, gloo ---------------------------------------------------------------


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[Callable[[], None]]]:
    """A world of one process as torchrun describes it; what was registered to run at exit, instead of running it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    at_exit: List[Callable[[], None]] = []
    monkeypatch.setattr(atexit, "register", at_exit.append)
    monkeypatch.setattr(distributed, "_GROUP", distributed._Ownership())
    try:
        yield at_exit
    finally:
        if dist.is_initialized():
            distributed_c10d.destroy_process_group()  # torch's own: a test may have replaced dist's


def test_the_group_made_for_the_trainers_is_destroyed_once_at_exit(one_rank: List[Callable[[], None]]) -> None:
    distributed.join_process_group(torch.device("cpu"), timeout_s=30)
    distributed.join_process_group(torch.device("cpu"), timeout_s=30)  # the next row's trainer: the same group
    assert dist.is_initialized() and one_rank == [distributed.leave_process_group]
    one_rank[0]()
    assert not dist.is_initialized()
    distributed.leave_process_group()  # again (an explicit call, then the one at exit): nothing to do


def test_a_group_made_elsewhere_is_left_to_its_maker(one_rank: List[Callable[[], None]]) -> None:
    dist.init_process_group("gloo")
    distributed.join_process_group(torch.device("cpu"), timeout_s=30)
    distributed.leave_process_group()
    assert dist.is_initialized() and one_rank == []


def test_after_a_failed_step_the_group_is_aborted_not_flushed(
    one_rank: List[Callable[[], None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destroy would wait for the collectives the failed step left queued; the abort drops them."""
    calls: List[str] = []
    abort = distributed_c10d._abort_process_group

    def aborting() -> None:
        calls.append("abort")
        abort()

    monkeypatch.setattr(distributed_c10d, "_abort_process_group", aborting)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append("destroy"))

    def broken(*args: Any) -> None:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(distributed, "step", broken)
    distributed.join_process_group(torch.device("cpu"), timeout_s=30)
    trainer = object.__new__(distributed.DistributedTrainer)  # its step alone: no stages needed
    trainer.pipe, trainer.rank, trainer.size, trainer.precision = None, 0, 1, "fp32"
    with pytest.raises(RuntimeError, match="Connection closed"):
        trainer.step(None, None)
    one_rank[0]()
    assert calls == ["abort"] and not dist.is_initialized()


def test_collectives_that_succeed_leave_the_group_to_be_destroyed(one_rank: List[Callable[[], None]]) -> None:
    distributed.join_process_group(torch.device("cpu"), timeout_s=30)
    trainer = object.__new__(distributed.DistributedTrainer)
    trainer.device, trainer.size = torch.device("cpu"), 1
    trainer.barrier()
    assert trainer.slowest(1.5) == 1.5 and trainer.gather("x") == ["x"]
    assert not distributed._GROUP.failed
    one_rank[0]()
    assert not dist.is_initialized()


@pytest.mark.cuda
@pytest.mark.timeout(120)
def test_an_nccl_group_is_destroyed_at_exit(one_rank: List[Callable[[], None]]) -> None:
    distributed.join_process_group(torch.device("cuda", 0), timeout_s=60)
    assert dist.get_backend() == "nccl"
    trainer = object.__new__(distributed.DistributedTrainer)
    trainer.device, trainer.size = torch.device("cuda", 0), 1
    assert trainer.slowest(2.0) == 2.0
    one_rank[0]()
    assert not dist.is_initialized()
