"""The GPipe module's public surface, checked against torchgpipe 0.0.7's semantics."""

from __future__ import annotations

import threading
import traceback
from typing import Any, List

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.skip import skippable, stash
from helpers import ThreadCount


def _model(n: int = 4) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(3, 3) for _ in range(n)])


# -- construction ----------------------------------------------------------


def test_attributes_and_coercion() -> None:
    model = GPipe(_model(), (1, 3), devices=["cpu", "cpu"], chunks=2.0, checkpoint="never")  # type: ignore[arg-type]
    assert model.balance == [1, 3]
    assert model.devices == [torch.device("cpu"), torch.device("cpu")]
    assert model.chunks == 2 and isinstance(model.chunks, int)
    assert model.checkpoint == "never"
    assert isinstance(model.partitions, nn.ModuleList)
    assert all(isinstance(p, nn.Sequential) for p in model.partitions)
    assert [len(p) for p in model.partitions] == [1, 3]


def test_defaults() -> None:
    model = GPipe(_model(), [4], devices=["cpu"])
    assert model.chunks == 1
    assert model.checkpoint == "except_last"


def test_devices_trimmed_and_extra_devices_ignored() -> None:
    model = GPipe(_model(), [2, 2], devices=["cpu:0", "cpu:1", "cpu:2"])
    assert model.devices == [torch.device("cpu", 0), torch.device("cpu", 1)]


def test_state_dict_keys() -> None:
    model = GPipe(_model(), [1, 3], devices=["cpu", "cpu"])
    keys = list(model.state_dict())
    assert keys[:2] == ["partitions.0.0.weight", "partitions.0.0.bias"]
    assert "partitions.1.3.weight" in keys


def test_not_sequential() -> None:
    with pytest.raises(TypeError, match="nn.Sequential"):
        GPipe(nn.Linear(3, 3), [1], devices=["cpu"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "balance, match",
    [
        (None, "balance is required"),
        ([1, 2], r"module: 4, sum of balance: 3"),
        ([5], r"module: 4, sum of balance: 5"),
        ([0, 4], "positive integer"),
        ([-1, 5], "positive integer"),
    ],
)
def test_bad_balance(balance: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        GPipe(_model(), balance, devices=["cpu", "cpu"])
    if balance is not None:
        assert "gpipe_bench.pipe.balance" in str(info.value)


@pytest.mark.parametrize("chunks", [0, -1])
def test_bad_chunks(chunks: int) -> None:
    with pytest.raises(ValueError, match="chunks"):
        GPipe(_model(), [4], devices=["cpu"], chunks=chunks)


def test_bad_checkpoint() -> None:
    with pytest.raises(ValueError, match="'sometimes'"):
        GPipe(_model(), [4], devices=["cpu"], checkpoint="sometimes")


def test_duplicate_children() -> None:
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="duplicate children"):
        GPipe(nn.Sequential(layer, layer), [1, 1], devices=["cpu", "cpu"])


def test_shared_parameters() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError, match="duplicate parameters"):
        GPipe(nn.Sequential(a, b), [1, 1], devices=["cpu", "cpu"])


def test_too_few_devices() -> None:
    with pytest.raises(IndexError, match="devices: 1, partitions: 2"):
        GPipe(_model(), [2, 2], devices=["cpu"])


def test_stash_pop_mismatch_is_type_error() -> None:
    @skippable(stash=["x"])
    class Lonely(nn.Module):
        def forward(self, x: Tensor) -> Any:
            yield stash("x", x)
            return x

    with pytest.raises(TypeError, match="'x' is stashed but no later layer pops it"):
        GPipe(nn.Sequential(Lonely(), nn.ReLU()), [2], devices=["cpu"])


# -- sequence behaviour and device moves -------------------------------------


def test_len_index_iter() -> None:
    layers = _model(5)
    model = GPipe(layers, [2, 3], devices=["cpu", "cpu"])
    assert len(model) == 5
    assert [model[i] for i in range(5)] == list(layers)
    assert model[-1] is layers[4] and model[-5] is layers[0]
    assert list(model) == list(layers)
    with pytest.raises(IndexError):
        model[5]
    with pytest.raises(IndexError):
        model[-6]


def test_moves_denied_casts_allowed() -> None:
    model = GPipe(_model(), [4], devices=["cpu"])
    for move in (
        lambda: model.cuda(),
        lambda: model.cpu(),
        lambda: model.to("cpu"),
        lambda: model.to(0),
        lambda: model.to(torch.device("cpu")),
        lambda: model.to(device="cpu"),
        lambda: model.to(torch.zeros(1)),
        lambda: model.to(tensor=torch.zeros(1)),
    ):
        with pytest.raises(TypeError, match="denied to move"):
            move()
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.half()
    assert all(p.dtype == torch.float16 for p in model.parameters())


# -- input and output --------------------------------------------------------


def test_tensor_and_tuple_input() -> None:
    class Pair(nn.Module):
        def forward(self, xs: Any) -> Any:
            a, b = xs
            return a * 2, b + 1

    model = GPipe(nn.Sequential(Pair(), Pair()), [1, 1], devices=["cpu:0", "cpu:1"], chunks=3)
    a, b = model((torch.ones(7, 2), torch.zeros(7)))
    assert torch.equal(a, torch.full((7, 2), 4.0)) and torch.equal(b, torch.full((7,), 2.0))


@pytest.mark.parametrize("batch, chunks", [(10, 4), (3, 8), (1, 5)])
def test_indivisible_and_small_batches(batch: int, chunks: int, recwarn: Any) -> None:
    layers = _model(2)
    model = GPipe(layers, [1, 1], devices=["cpu:0", "cpu:1"], chunks=chunks)
    x = torch.randn(batch, 3)
    assert torch.allclose(model(x), layers(x), atol=1e-6)
    assert len(recwarn) == 0


def test_bad_input_types() -> None:
    model = GPipe(_model(), [4], devices=["cpu"])
    with pytest.raises(TypeError):
        model([torch.ones(2, 3)])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        model((torch.ones(2, 3), 1))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        model(torch.ones(2, 3), torch.ones(2, 3))  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        model("input")  # type: ignore[arg-type]


def test_empty_sequential_is_identity() -> None:
    model = GPipe(nn.Sequential(), [], devices=[])
    x = torch.ones(2)
    assert model(x) is x


def test_non_tensor_output_is_type_error() -> None:
    class Bad(nn.Module):
        def forward(self, x: Tensor) -> Any:
            return [x]

    model = GPipe(nn.Sequential(Bad()), [1], devices=["cpu"])
    with pytest.raises(TypeError, match="partition 0 returned list"):
        model(torch.ones(2, 3))


def test_no_grad_and_eval() -> None:
    layers = _model()
    model = GPipe(layers, [2, 2], devices=["cpu:0", "cpu:1"], chunks=2)
    x = torch.randn(4, 3)
    with torch.no_grad():
        y = model(x)
    assert not y.requires_grad
    model.eval()
    assert torch.allclose(model(x), layers(x), atol=1e-6)


def test_autograd_grad_wrt_parameters() -> None:
    """torch.autograd.grad over the parameters works as with the plain model (no .grad written)."""
    torch.manual_seed(0)
    layers = _model().double()
    model = GPipe(layers, [2, 2], devices=["cpu:0", "cpu:1"], chunks=3)
    x = torch.randn(6, 3, dtype=torch.float64)
    grads = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    expected = torch.autograd.grad(layers(x).sum(), list(layers.parameters()))
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_get_no_gradient() -> None:
    layers = _model()
    layers[0].weight.requires_grad_(False)
    model = GPipe(layers, [2, 2], devices=["cpu:0", "cpu:1"], chunks=2)
    model(torch.randn(4, 3)).sum().backward()
    assert layers[0].weight.grad is None
    assert layers[3].weight.grad is not None


def test_second_backward_is_a_clear_error() -> None:
    model = GPipe(_model(), [2, 2], devices=["cpu", "cpu"], chunks=2)
    loss = model(torch.randn(4, 3)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_gpipe_inside_a_larger_graph() -> None:
    """Input from earlier layers requires grad; GPipe's output feeds later ones."""
    torch.manual_seed(0)
    pre, post = nn.Linear(3, 3).double(), nn.Linear(3, 1).double()
    layers = _model().double()
    model = GPipe(layers, [1, 3], devices=["cpu:0", "cpu:1"], chunks=2)
    x = torch.randn(4, 3, dtype=torch.float64)
    post(model(pre(x))).sum().backward()
    got = [p.grad.clone() for p in pre.parameters()]  # type: ignore[union-attr]
    pre.zero_grad()
    post(layers(pre(x))).sum().backward()
    for g, p in zip(got, pre.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-10, atol=1e-12)  # type: ignore[arg-type]


# -- parallelism and errors ----------------------------------------------------


class _Recorder(nn.Module):
    def __init__(self, log: List[Any], tag: int) -> None:
        super().__init__()
        self.log, self.tag = log, tag

    def forward(self, x: Tensor) -> Tensor:
        self.log.append((self.tag, threading.current_thread().name))
        return x


def test_virtual_cpu_devices_get_own_threads_cpu_shares_caller() -> None:
    log: List[Any] = []
    model = GPipe(nn.Sequential(_Recorder(log, 0), _Recorder(log, 1)), [1, 1], devices=["cpu:0", "cpu:1"])
    model(torch.ones(2, 1))
    threads = {tag: name for tag, name in log}
    assert threads[0] != threads[1] and threading.current_thread().name not in threads.values()

    log.clear()
    model = GPipe(nn.Sequential(_Recorder(log, 0), _Recorder(log, 1)), [1, 1], devices=["cpu", "cpu"])
    model(torch.ones(2, 1))
    assert {name for _, name in log} == {threading.current_thread().name}


def test_worker_threads_divide_intra_op_threads() -> None:
    seen: List[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        model = GPipe(nn.Sequential(ThreadCount(seen), ThreadCount(seen)), [1, 1], devices=["cpu:0", "cpu:1"])
        model(torch.ones(2, 1))
        assert seen == [2, 2]
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


class Boom(Exception):
    pass


def _explode(x: Tensor) -> Tensor:
    raise Boom("partition failed")


class Exploding(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _explode(x)


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1"]])
def test_exception_reaches_caller_and_pipeline_stops(devices: List[str]) -> None:
    counted: List[int] = []

    class Count(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            counted.append(x.size(0))
            return x

    baseline = threading.active_count()
    model = GPipe(nn.Sequential(Count(), Exploding()), [1, 1], devices=devices, chunks=8)
    with pytest.raises(Boom) as info:
        model(torch.ones(8, 1))
    frames = [frame.name for frame in traceback.extract_tb(info.tb)]
    assert "_explode" in frames
    # Partition 1 fails on micro-batch 0 at clock 1: partition 0 ran clocks 0 and 1 only.
    assert len(counted) == 2
    assert threading.active_count() == baseline


def test_exception_in_backward_reaches_caller() -> None:
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, g: Tensor) -> Tensor:
            raise Boom("backward failed")

    class Layer(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return BadGrad.apply(x)

    baseline = threading.active_count()
    model = GPipe(nn.Sequential(nn.Linear(1, 1), Layer()), [1, 1], devices=["cpu:0", "cpu:1"], chunks=4)
    with pytest.raises(Boom):
        model(torch.ones(4, 1)).sum().backward()
    assert threading.active_count() == baseline
