"""Code written for torchgpipe 0.0.7 runs on ours after changing one import.

Skipped unless the peer is installed (``pip install -e '.[peers]'``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest
import torch
from torch import nn

import gpipe_bench.pipe as ours
import gpipe_bench.pipe.balance as ours_balance
import gpipe_bench.pipe.skip as ours_skip

torchgpipe = pytest.importorskip("torchgpipe")
import torchgpipe.balance as peer_balance  # noqa: E402
import torchgpipe.skip as peer_skip  # noqa: E402


def _parameters(fn: Callable[..., Any]) -> list:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    "mine, theirs",
    [
        (ours.GPipe.__init__, torchgpipe.GPipe.__init__),
        (ours_balance.balance_by_time, peer_balance.balance_by_time),
        (ours_balance.balance_by_size, peer_balance.balance_by_size),
        (ours_skip.skippable, peer_skip.skippable),
    ],
)
def test_signatures_match(mine: Callable[..., Any], theirs: Callable[..., Any]) -> None:
    assert _parameters(mine) == _parameters(theirs)


def test_public_names() -> None:
    for name in ("GPipe", "is_checkpointing", "is_recomputing"):
        assert hasattr(ours, name) and hasattr(torchgpipe, name)
    for name in ("skippable", "stash", "pop", "Namespace", "verify_skippables"):
        assert hasattr(ours_skip, name) and hasattr(peer_skip, name)


def _script(lib: Any, skip: Any) -> Any:
    """A torchgpipe user's script, parameterised only by the imported modules."""

    @skip.skippable(stash=["identity"])
    class Fork(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            yield skip.stash("identity", x)
            return x

    @skip.skippable(pop=["identity"])
    class Join(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            identity = yield skip.pop("identity")
            return x + identity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Fork(), nn.Linear(4, 4), nn.ReLU(), Join(), nn.Linear(4, 2)).double()
    model = lib.GPipe(model, balance=[2, 2, 2], devices=["cpu", "cpu", "cpu"], chunks=3)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    out = model(x)
    out.pow(2).sum().backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return out.detach(), x.grad, [p.grad for p in model.parameters()], state


def test_same_script_same_results() -> None:
    out_a, gx_a, grads_a, state_a = _script(ours, ours_skip)
    out_b, gx_b, grads_b, state_b = _script(torchgpipe, peer_skip)
    assert torch.allclose(out_a, out_b, rtol=1e-12, atol=1e-14)
    assert torch.allclose(gx_a, gx_b, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert list(state_a) == list(state_b)  # same state-dict keys: checkpoints load across engines
