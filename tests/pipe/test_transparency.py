"""The acceptance test: GPipe computes the same function as the plain model.

Random ``nn.Sequential`` models (Linear, Conv2d, BatchNorm, ReLU, Tanh, layers
taking and returning tuples, an integer tensor riding along, skip connections
across partitions), random balances, chunks 1..8, all checkpoint modes, the
``cpu`` device and virtual CPU devices with repeats. Outputs, the input's
gradient and every parameter gradient must equal the plain model's, and so
must the parameters after an optimizer step.

The reference is the plain model run on the same micro-batches with gradients
accumulated: that is GPipe's definition, and for models without BatchNorm it is
the plain model on the whole batch up to rounding (checked too). With
``deferred_batch_norm`` the running statistics must equal a plain model's fed
the whole mini-batch.

Dropout draws from a random generator that the plain model and the pipeline
consume in different orders, so models with dropout are compared against the
pipeline itself with ``checkpoint='never'`` on one worker (same draw order):
that checks that recomputation replays the masks exactly.
"""
from __future__ import annotations

import copy
from typing import Any, List, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.skip import Namespace
from helpers import Pop, Stash

D = 6  # feature width of the vector family
C = 2  # channels of the conv family


class Split(nn.Module):
    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x, x * 0.5 + 1.0


class TupleLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D)

    def forward(self, xs: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        a, b = xs
        return self.linear(a), b


class TupleAct(nn.Module):
    def forward(self, xs: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        a, b = xs
        return torch.relu(a), torch.tanh(b)


class Merge(nn.Module):
    def forward(self, xs: Tuple[Tensor, Tensor]) -> Tensor:
        a, b = xs
        return a + b * b


class WithIndex(nn.Module):
    """Carries a non-differentiable integer tensor along the batch."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x, torch.arange(x.size(0), device=x.device) % 3


class UseIndex(nn.Module):
    def forward(self, xs: Tuple[Tensor, Tensor]) -> Tensor:
        x, idx = xs
        shape = (-1,) + (1,) * (x.dim() - 1)
        return x * (idx.to(x.dtype).view(shape) + 1.0)


def _vector_block(kind: str) -> List[nn.Module]:
    return {
        "linear": lambda: [nn.Linear(D, D)],
        "relu": lambda: [nn.ReLU()],
        "tanh": lambda: [nn.Tanh()],
        "bn": lambda: [nn.BatchNorm1d(D)],
        "dropout": lambda: [nn.Dropout(0.3)],
        "tuple": lambda: [Split(), TupleLinear(), TupleAct(), Merge()],
        "index": lambda: [WithIndex(), UseIndex()],
    }[kind]()


def _conv_block(kind: str) -> List[nn.Module]:
    return {
        "conv": lambda: [nn.Conv2d(C, C, 3, padding=1)],
        "bn": lambda: [nn.BatchNorm2d(C)],
        "relu": lambda: [nn.ReLU()],
        "index": lambda: [WithIndex(), UseIndex()],
    }[kind]()


def _skip(inner: List[nn.Module]) -> List[nn.Module]:
    ns = Namespace()
    return [Stash().isolate(ns), *inner, Pop().isolate(ns)]


@st.composite
def models(draw: Any, family: str) -> Tuple[List[nn.Module], bool]:
    kinds = ["linear", "relu", "tanh", "bn", "tuple", "index", "dropout"] if family == "vector" else ["conv", "bn", "relu", "index"]
    block = _vector_block if family == "vector" else _conv_block
    first = "linear" if family == "vector" else "conv"
    layers: List[nn.Module] = block(first)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(kinds))
        if draw(st.integers(0, 3)) == 0:
            inner = block(kind) + block(draw(st.sampled_from(kinds)))
            layers += _skip(inner)
        else:
            layers += block(kind)
    layers += block(first)
    has_dropout = any(isinstance(layer, nn.Dropout) for layer in layers)
    return layers, has_dropout


@st.composite
def balances(draw: Any, length: int) -> List[int]:
    k = draw(st.integers(1, min(4, length)))
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), min_size=k - 1, max_size=k - 1))) if k > 1 else []
    edges = [0, *cuts, length]
    return [b - a for a, b in zip(edges, edges[1:])]


def _device_list(kind: str, k: int) -> List[str]:
    if kind == "cpu":
        return ["cpu"] * k
    if kind == "virtual":
        return [f"cpu:{j}" for j in range(k)]
    return [f"cpu:{j % 2}" for j in range(k)]  # repeats, not adjacent


def _rel_err(a: Tensor, b: Tensor, scale: float = 0.0) -> float:
    """Norm-wise relative error ||a - b|| / max(||b||, scale).

    ``scale`` is the norm of the whole quantity ``b`` is a part of (all parameter
    gradients together): a gradient that is mathematically zero (a conv bias
    before BatchNorm) holds only rounding noise, which is measured against the
    whole gradient, not against itself.
    """
    if not a.numel():
        return 0.0
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return (a64 - b64).norm().item() / max(b64.norm().item(), scale, 1e-12)


def _assert_close(a: Tensor, b: Tensor, tol: float, what: str, scale: float = 0.0) -> None:
    assert a.shape == b.shape, what
    err = _rel_err(a, b, scale)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def _train_step(model: nn.Module, x: Tensor, weight: Tensor, chunks: int, accumulate: bool) -> Tuple[Tensor, Tensor]:
    """Forward/backward; with ``accumulate``, the plain model over micro-batches."""
    x = x.detach().clone().requires_grad_()
    if accumulate:
        outs = []
        for piece, w in zip(x.chunk(chunks), weight.chunk(chunks)):
            out = model(piece)
            (out * w).sum().backward()
            outs.append(out.detach())
        output = torch.cat(outs)
    else:
        output = model(x)
        (output * weight).sum().backward()
    assert x.grad is not None
    return output.detach(), x.grad


def _check(
    layers: Sequence[nn.Module],
    balance: List[int],
    devices: List[str],
    chunks: int,
    checkpoint: str,
    deferred: bool,
    dtype: torch.dtype,
    x: Tensor,
    dropout: bool,
) -> None:
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    plain = nn.Sequential(*[copy.deepcopy(layer) for layer in layers]).to(dtype)
    model = copy.deepcopy(plain)
    gpipe = GPipe(model, balance, devices=devices, chunks=chunks, checkpoint=checkpoint, deferred_batch_norm=deferred)

    bn_inputs: dict = {}
    if dropout:
        reference = GPipe(copy.deepcopy(plain), balance, devices=devices, chunks=chunks, checkpoint="never",
                          deferred_batch_norm=deferred)
        weight = torch.randn_like(plain(x.clone()))
        torch.manual_seed(1234)
        ref_out, ref_grad = _train_step(reference, x, weight, chunks, accumulate=False)
        torch.manual_seed(1234)
        out, grad = _train_step(gpipe, x, weight, chunks, accumulate=False)
        ref_params = list(reference.parameters())
    else:
        weight = torch.randn_like(copy.deepcopy(plain)(x.clone()))
        for bn in _batchnorms(plain):
            bn.register_forward_hook(lambda m, inp, out: bn_inputs.setdefault(id(m), []).append(inp[0].detach()))
        ref_out, ref_grad = _train_step(plain, x, weight, chunks, accumulate=True)
        out, grad = _train_step(gpipe, x, weight, chunks, accumulate=False)
        ref_params = list(plain.parameters())

    _assert_close(out, ref_out, tol, "output")
    _assert_close(grad, ref_grad, tol, "input gradient")
    params = list(gpipe.parameters())
    assert len(params) == len(ref_params)
    whole = torch.cat([q.grad.flatten().to(torch.float64) for q in ref_params if q.grad is not None]).norm().item()
    for k, (p, q) in enumerate(zip(params, ref_params)):
        assert (p.grad is None) == (q.grad is None), f"parameter {k}: gradient presence differs"
        if p.grad is not None and q.grad is not None:
            _assert_close(p.grad, q.grad, tol, f"gradient of parameter {k}", whole)

    # After an optimizer step the parameters still match.
    for opt_params in (params, ref_params):
        torch.optim.SGD(opt_params, lr=0.1).step()
    weights = torch.cat([q.detach().flatten().to(torch.float64) for q in ref_params]).norm().item()
    for k, (p, q) in enumerate(zip(params, ref_params)):
        _assert_close(p.detach(), q.detach(), tol, f"parameter {k} after SGD", weights)

    # Running statistics. Plain BatchNorm in the pipeline updates once per micro-batch, like the
    # reference. A deferred BatchNorm must hold what a plain BatchNorm would after seeing, at once,
    # everything that reached it in this mini-batch (its micro-batch inputs, concatenated).
    if not dropout:
        names = ("running_mean", "running_var", "num_batches_tracked")
        got = [b for name, b in gpipe.named_buffers() if name.rsplit(".", 1)[-1] in names]
        if deferred:
            expected = []
            for original, seen in zip(_batchnorms(layers), _batchnorms(plain)):
                fresh = copy.deepcopy(original).to(dtype).train()
                with torch.no_grad():
                    fresh(torch.cat(bn_inputs[id(seen)]))
                expected += [fresh.running_mean, fresh.running_var, fresh.num_batches_tracked]
        else:
            expected = [b for name, b in plain.named_buffers() if name.rsplit(".", 1)[-1] in names]
        assert len(got) == len(expected)
        for k, (a, b) in enumerate(zip(got, expected)):
            # Running statistics start at mean 0 and variance 1: measure against that unit scale.
            _assert_close(a.to(torch.float64), b.to(torch.float64), tol, f"BatchNorm buffer {k}", 1.0)


def _batchnorms(layers: Any) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]


SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=st.data())
@pytest.mark.parametrize("family", ["vector", "conv"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpipe_equals_plain_model(family: str, dtype: torch.dtype, data: st.DataObject) -> None:
    layers, dropout = data.draw(models(family), label="layers")
    balance = data.draw(balances(len(layers)), label="balance")
    chunks = data.draw(st.integers(1, 8), label="chunks")
    checkpoint = data.draw(st.sampled_from(["always", "except_last", "never"]), label="checkpoint")
    device_kind = "cpu" if dropout else data.draw(st.sampled_from(["cpu", "virtual", "repeated"]), label="devices")
    devices = _device_list(device_kind, len(balance))
    has_bn = any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in layers)
    deferred = has_bn and data.draw(st.booleans(), label="deferred")
    batch = data.draw(st.integers(1, 24), label="batch")
    if has_bn:
        # Training BatchNorm needs at least two values per channel in every micro-batch.
        # In float32, BatchNorm over 2-3 values is so ill-conditioned that its input
        # gradient (mathematically near zero) is rounding noise; ask for 4.
        sizes = [len(c) for c in torch.empty(batch).chunk(chunks)]
        assume(family == "conv" or min(sizes) >= (2 if dtype == torch.float64 else 4))
    shape = (batch, D) if family == "vector" else (batch, C, 4, 4)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype)
    _check(layers, balance, devices, chunks, checkpoint, deferred, dtype, x, dropout)


@pytest.mark.parametrize("devices", [["cpu", "cpu", "cpu"], ["cpu:0", "cpu:1", "cpu:2"]])
def test_no_batchnorm_equals_whole_batch(devices: List[str]) -> None:
    """Without BatchNorm, micro-batching changes nothing but rounding: compare with the whole batch."""
    torch.manual_seed(0)
    layers = [nn.Linear(D, D), nn.Tanh(), *_skip([nn.Linear(D, D), nn.ReLU()]), nn.Linear(D, D)]
    plain = nn.Sequential(*layers).double()
    gpipe = GPipe(copy.deepcopy(plain), [2, 2, 3], devices=devices, chunks=5)
    x = torch.randn(13, D, dtype=torch.float64)
    weight = torch.randn(13, D, dtype=torch.float64)
    ref_out, ref_grad = _train_step(plain, x, weight, 1, accumulate=False)
    out, grad = _train_step(gpipe, x, weight, 5, accumulate=False)
    _assert_close(out, ref_out, 1e-10, "output")
    _assert_close(grad, ref_grad, 1e-10, "input gradient")
    for p, q in zip(gpipe.parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None
        _assert_close(p.grad, q.grad, 1e-10, "parameter gradient")
