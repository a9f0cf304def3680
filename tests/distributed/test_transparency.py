"""torch.distributed.pipelining across processes (CPU, gloo) equals the plain model, BatchNorm included.

One launch of processes (spawn, bounded in time) per world size runs every
case of that size in turn, each its own model, schedule and optimizer step in
the same process group (starting processes costs far more than a case): after
one optimizer step every rank's stage must equal the plain model's layers after
gradient accumulation over the same micro-batches, parameters and BatchNorm
statistics, and the plain full-batch step when the model has no BatchNorm.
"""

from __future__ import annotations

import multiprocessing
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gpipe_bench.distributed import schedule as sched
from gpipe_bench.distributed.stages import CarrySkips, carried_keys, materialize, stage_range
from gpipe_bench.pipe.skip import Namespace, pop, skippable, stash

BATCH, CHUNKS = 8, 4


@skippable(stash=["identity"])
class _Fork(nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        yield stash("identity", x)
        return x


@skippable(pop=["identity"])
class _Add(nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        identity = yield pop("identity")
        return x + identity


class _Split(nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return x[:, :10], x[:, 10:]


class _Cat(nn.Module):
    def forward(self, halves: Any) -> torch.Tensor:
        return torch.cat(halves, dim=1)  # its backward hands each half a strided view of the gradient


def _model(batch_norm: bool, skips: bool = False, halves: bool = False) -> nn.Sequential:
    if halves:  # a tuple output cut from a concatenation: AmoebaNet's cells between stages
        return nn.Sequential(
            nn.Linear(6, 16),
            nn.Tanh(),
            _Split(),
            _Cat(),
            nn.Linear(16, 16),
            nn.BatchNorm1d(16),
            nn.Tanh(),
            nn.Linear(16, 5),
        ).double()
    if skips:  # a residual block whose fork and addition land on different stages
        ns = Namespace()
        return nn.Sequential(
            nn.Linear(6, 16),
            _Fork().isolate(ns),
            nn.Linear(16, 16),
            nn.BatchNorm1d(16),
            nn.Tanh(),
            nn.Linear(16, 16),
            _Add().isolate(ns),
            nn.Tanh(),
            nn.Linear(16, 5),
        ).double()
    layers: List[nn.Module] = [nn.Linear(6, 16)]
    for _ in range(3):
        layers += [nn.BatchNorm1d(16) if batch_norm else nn.Identity(), nn.Tanh(), nn.Linear(16, 16)]
    layers += [nn.Tanh(), nn.Linear(16, 5)]
    return nn.Sequential(*layers).double()


def _balance(world: int, length: int) -> List[int]:
    base = [length // world] * world
    base[-1] += length - sum(base)
    return base


def _batch() -> Any:
    g = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=g)


@dataclass(frozen=True)
class Case:
    """One model and schedule stepped once on ``world`` processes."""

    world: int
    schedule: str
    batch_norm: bool
    skips: bool = False  # a residual block whose fork and addition land on different stages
    halves: bool = False  # a tuple output cut before a concatenation

    @property
    def name(self) -> str:
        return f"{self.world}-{self.schedule}-bn{int(self.batch_norm)}-skips{int(self.skips)}-halves{int(self.halves)}"


CASES = (
    [Case(w, s, bn) for w in (2, 4) for s in ("gpipe", "1f1b", "interleaved") for bn in (True, False)]
    + [Case(2, s, True, skips=True) for s in ("gpipe", "1f1b", "interleaved")]
    + [Case(2, s, True, halves=True) for s in ("gpipe", "1f1b")]
)


def _step(rank: int, case: Case, out: str) -> None:
    world, schedule = case.world, case.schedule
    with torch.device("meta"):
        model = _model(case.batch_norm, case.skips, case.halves)
    stages = 2 * world if schedule == "interleaved" else world  # interleaved: two stages per process
    balance = [3, 5] if case.halves else _balance(stages, len(model))
    modules: Dict[int, nn.Module] = {}
    state: Dict[str, torch.Tensor] = {}
    for index in sched.local_stages(stages, rank, world, schedule):
        start, end = stage_range(balance, index)
        layers = materialize(model[start:end], torch.device("cpu"), seed=3, first_index=start).double()
        incoming, outgoing = carried_keys(model, balance, index)
        modules[index] = CarrySkips(layers, incoming, outgoing) if case.skips or case.halves else layers
        state.update(layers.state_dict(keep_vars=True))  # a slice keeps the layers' global names
    params = [p for m in modules.values() for p in m.parameters()]  # a rank may hold only Tanh layers
    optimizer = torch.optim.SGD(params, lr=0.5) if params else None
    pipe = sched.make_schedule(
        modules, rank, world, torch.device("cpu"), CHUNKS, schedule, F.cross_entropy, stages=stages
    )
    x, y = _batch()
    sched.step(pipe, rank, world, x if rank == 0 else None, y if rank == world - 1 else None)
    if optimizer is not None:
        optimizer.step()
    torch.save({k: v.detach() for k, v in state.items()}, f"{out}/{case.name}-rank{rank}.pt")


def _rank(rank: int, world: int, port: int, cases: List[Case], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in cases:
            _step(rank, case, out)
            dist.barrier()  # the next case's messages never meet this one's
    finally:
        dist.destroy_process_group()


def _reference(
    batch_norm: bool, accumulate: bool, skips: bool = False, halves: bool = False
) -> Dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = _model(batch_norm, skips, halves)
    plain = materialize(model, torch.device("cpu"), seed=3, first_index=0).double()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.5)
    x, y = _batch()
    optimizer.zero_grad()
    if accumulate:
        for xi, yi in zip(x.chunk(CHUNKS), y.chunk(CHUNKS)):
            (F.cross_entropy(plain(xi), yi) / CHUNKS).backward()
    else:
        F.cross_entropy(plain(x), y).backward()
    optimizer.step()
    return plain.state_dict()


_LAUNCHED: Dict[int, Dict[str, Dict[str, torch.Tensor]]] = {}


def _launch(world: int, root: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every case of ``world`` processes, stepped in one launch: case name -> merged state of all ranks."""
    cases = [c for c in CASES if c.world == world]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_rank, args=(r, world, port, cases, str(root)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    assert not alive, "a rank did not finish within 240 s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    merged: Dict[str, Dict[str, torch.Tensor]] = {}
    for case in cases:
        merged[case.name] = {}
        for r in range(world):
            merged[case.name].update(torch.load(root / f"{case.name}-rank{r}.pt"))
    return merged


def _states(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, torch.Tensor]:
    if case.world not in _LAUNCHED:
        _LAUNCHED[case.world] = _launch(case.world, tmp_path_factory.mktemp(f"world{case.world}"))
    return _LAUNCHED[case.world][case.name]


def _assert_equal(ours: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(reference)
    for key, value in reference.items():
        if value.is_floating_point():
            assert torch.allclose(ours[key], value, rtol=0, atol=1e-12), key
        else:
            assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("case", [c for c in CASES if not (c.skips or c.halves)], ids=lambda c: c.name)
def test_a_distributed_step_equals_the_plain_model(case: Case, tmp_path_factory: pytest.TempPathFactory) -> None:
    ours = _states(case, tmp_path_factory)
    _assert_equal(ours, _reference(case.batch_norm, accumulate=True))
    if not case.batch_norm:
        _assert_equal(ours, _reference(False, accumulate=False))


@pytest.mark.parametrize("case", [c for c in CASES if c.skips], ids=lambda c: c.name)
def test_skip_connections_cut_between_stages_travel_with_the_outputs(
    case: Case, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The fork on stage 0, the addition on the last."""
    _assert_equal(_states(case, tmp_path_factory), _reference(True, accumulate=True, skips=True))


@pytest.mark.parametrize("case", [c for c in CASES if c.halves], ids=lambda c: c.name)
def test_a_tuple_cut_before_a_concatenation_sends_contiguous_gradients(
    case: Case, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Stage 0 ends on the split, stage 1 starts on the concatenation."""
    _assert_equal(_states(case, tmp_path_factory), _reference(True, accumulate=True, halves=True))


@pytest.mark.parametrize("inplace", [False, True])
def test_a_stage_may_start_with_an_in_place_layer(inplace: bool) -> None:
    """The received input is a leaf that requires grad: an in-place first layer works on a copy of it."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).double()
    received = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    CarrySkips(nn.Sequential(nn.ReLU(inplace=inplace), linear), [], []).forward(received).sum().backward()
    plain = received.detach().requires_grad_()
    linear(torch.relu(plain)).sum().backward()
    assert received.grad is not None and plain.grad is not None and received.grad.is_contiguous()
    assert torch.equal(received.grad, plain.grad)
