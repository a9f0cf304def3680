"""optim.py: the one optimizer set-up, read whole from the config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpipe_bench import optim
from gpipe_bench.errors import HarnessError


def test_every_key_reaches_the_optimizer() -> None:
    model = nn.Linear(2, 2)
    sgd = optim.build(
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}, model.parameters()
    )
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.9, True, 1e-4)
    assert isinstance(optim.build({"name": "RMSprop", "lr": 0.01}, model.parameters()), torch.optim.RMSprop)


def test_a_bad_optimizer_is_one_line() -> None:
    with pytest.raises(HarnessError, match="not supported; use one of: sgd, rmsprop, adam"):
        optim.build({"name": "lamb"}, nn.Linear(2, 2).parameters())
    with pytest.raises(HarnessError, match="sgd rejects it"):
        optim.build({"name": "sgd", "lr": 0.1, "momentom": 0.9}, nn.Linear(2, 2).parameters())


def test_model_state_is_gradients_and_buffers() -> None:
    model = nn.Linear(2, 2)
    optimizer = optim.build({"name": "rmsprop", "lr": 0.01}, model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    state = optim.model_state(model.parameters(), optimizer)
    grads = [p.grad for p in model.parameters()]
    assert all(any(s is g for s in state) for g in grads)
    assert len(state) > len(grads)  # square_avg (and step) per parameter
