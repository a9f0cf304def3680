"""AmoebaNet-D: exact table-era parameter and layer counts, and that the flat model
runs plain, sliced, and inside GPipe at the published balances."""

from __future__ import annotations

import copy
from typing import Any, List, Tuple

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.models.amoebanet import (
    LAYERS_PER_CELL,
    MIN_INPUT_SIZE,
    amoebanetd,
    amoebanetd_corrected,
    num_model_layers,
)
from gpipe_bench.pipe import GPipe
from helpers import run_micro_batches

# (L, F) → parameters at 10 classes, as published for the GPipe tables.
TABLE_COUNTS = {
    (4, 512): 380_274_698,
    (6, 208): 89_745_302,
    (6, 416): 358_456_186,
    (6, 544): 612_770_042,
    (12, 544): 1_163_292_602,
    (24, 512): 2_005_905_418,
}

# torchgpipe's AmoebaNet-D (L=4) speed benchmark: naive-2, pipeline-2, -4, -8.
BALANCES = [
    [84, 241],
    [144, 181],
    [78, 77, 92, 78],
    [43, 35, 36, 38, 43, 45, 46, 39],
]


def _meta(builder: Any, **kwargs: Any) -> nn.Sequential:
    with torch.device("meta"):
        model: nn.Sequential = builder(**kwargs)
    return model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small(num_layers: int = 4, num_filters: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return amoebanetd(num_layers=num_layers, num_filters=num_filters).double()


def _rel_err(a: Tensor, b: Tensor, scale: float = 0.0) -> float:
    return float((a - b).norm().item()) / max(float(b.norm().item()), scale, 1e-300)


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize("size, expected", sorted(TABLE_COUNTS.items()), ids=lambda v: str(v))
def test_table_parameter_and_layer_counts(size: Tuple[int, int], expected: int) -> None:
    num_layers, num_filters = size
    model = _meta(amoebanetd, num_layers=num_layers, num_filters=num_filters, num_classes=10)
    assert _params(model) == expected
    assert len(model) == 60 * num_layers + 85 == num_model_layers(num_layers)


def test_defaults_are_the_325_layer_table_model() -> None:
    model = _meta(amoebanetd)
    assert len(model) == 325
    assert _params(model) == TABLE_COUNTS[(4, 512)]
    assert all(sum(balance) == 325 for balance in BALANCES)


@pytest.mark.parametrize("num_layers", [0, 1, 2, 3, 5])
def test_layer_count_formula(num_layers: int) -> None:
    model = _meta(amoebanetd, num_layers=num_layers, num_filters=8)
    assert len(model) == 4 + LAYERS_PER_CELL * (3 * num_layers + 4) + 1 == 60 * num_layers + 85


def test_table_era_pools_average_and_carry_a_conv() -> None:
    model = _meta(amoebanetd, num_layers=1, num_filters=8)
    max3 = [m for name, m in model.named_children() if "max_pool_3x3" in name]
    assert max3
    for branch in max3:
        pools = [m for m in branch.modules() if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d))]
        assert [type(p) for p in pools] == [nn.AvgPool2d]
        assert any(isinstance(m, nn.Conv2d) for m in branch.modules())


def test_corrected_variant() -> None:
    table = _meta(amoebanetd)
    corrected = _meta(amoebanetd_corrected)
    assert len(corrected) == len(table) == 325
    assert _params(corrected) < _params(table)
    max3 = [m for name, m in corrected.named_children() if "max_pool_3x3" in name]
    for branch in max3:
        assert not any(p.numel() for p in branch.parameters())
        assert any(isinstance(m, nn.MaxPool2d) and m.kernel_size == 3 for m in branch.modules())
    # Same balances apply: it runs, and has parameter gradients.
    torch.manual_seed(0)
    model = amoebanetd_corrected(num_layers=1, num_filters=8)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- running


def test_forward_backward_small() -> None:
    torch.manual_seed(0)
    model = amoebanetd(num_layers=1, num_filters=16, num_classes=7)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_224_on_meta_and_boundaries_carry_batch_first_tensors() -> None:
    model = _meta(amoebanetd, num_layers=1, num_filters=8)
    x: Any = torch.empty(3, 3, 224, 224, device="meta")
    for layer in model:
        x = layer(x)
        for t in x if isinstance(x, tuple) else (x,):
            assert isinstance(t, Tensor) and t.shape[0] == 3
    assert x.shape == (3, 10)


@pytest.mark.parametrize("size", [MIN_INPUT_SIZE, 32, 63, 95])
def test_input_sizes_that_work(size: int) -> None:
    assert MIN_INPUT_SIZE == 31
    model = _meta(amoebanetd, num_layers=1, num_filters=8)
    assert model(torch.empty(2, 3, size, size + 1 if size % 2 else size, device="meta")).shape == (2, 10)


@pytest.mark.parametrize("size", [16, 30, 33, 48])
def test_input_sizes_that_do_not(size: int) -> None:
    model = _meta(amoebanetd, num_layers=1, num_filters=8)
    with pytest.raises(ValueError, match="32·k − 1 or 32·k"):
        model(torch.empty(2, 3, size, size, device="meta"))


def test_slices_compose() -> None:
    model = _small().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        whole = model(x)
        # Every offset inside one cell (cell 2 starts at 4 + 2·20), and the published cuts.
        cuts = [0, 1, 4, 5] + [44 + k for k in range(LAYERS_PER_CELL + 1)] + [78, 155, 247, 43, 78, 114, 152, 324, 325]
        for a in sorted(set(cuts)):
            head = model[:a](x) if a else x
            assert torch.equal(model[a:](head), whole), a
        # Three pieces too.
        assert torch.equal(model[160:](model[78:160](model[:78](x))), whole)


@pytest.mark.parametrize("balance", BALANCES, ids=lambda b: f"{len(b)}x")
def test_gpipe_matches_plain_at_published_balances(balance: List[int]) -> None:
    chunks = 2
    plain = _small()
    piped = GPipe(copy.deepcopy(plain), balance, devices=[f"cpu:{i}" for i in range(len(balance))], chunks=chunks)

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64, generator=generator)
    weight = torch.randn(4, 10, dtype=torch.float64, generator=generator)

    expected = run_micro_batches(plain, x, weight, chunks)
    out = piped(x)
    assert isinstance(out, Tensor)
    (out * weight).sum().backward()

    assert _rel_err(out.detach(), expected) <= 1e-9
    ours = dict(piped.named_parameters())
    theirs = list(plain.parameters())
    assert len(ours) == len(theirs)
    scale = torch.cat([p.grad.flatten() for p in theirs if p.grad is not None]).norm().item()
    for (name, p), q in zip(ours.items(), theirs):
        assert p.grad is not None and q.grad is not None, name
        assert _rel_err(p.grad, q.grad, scale * 1e-3) <= 1e-9, name


@pytest.mark.parametrize("offset", range(1, LAYERS_PER_CELL))
def test_gpipe_cut_at_every_offset_inside_a_cell(offset: int) -> None:
    """Two partitions cut inside a reduction cell (cell 1) and a normal cell (cell 2)."""
    plain = _small(num_layers=1)
    first = 4 + 1 * LAYERS_PER_CELL + offset
    second = 4 + 2 * LAYERS_PER_CELL + (LAYERS_PER_CELL - offset)
    balance = [first, second - first, len(plain) - second]
    piped = GPipe(copy.deepcopy(plain), balance, devices=["cpu:0", "cpu:1", "cpu:2"], chunks=2, checkpoint="always")

    generator = torch.Generator().manual_seed(offset)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=generator)
    weight = torch.randn(4, 10, dtype=torch.float64, generator=generator)
    expected = run_micro_batches(plain, x, weight, 2)
    out = piped(x)
    assert isinstance(out, Tensor)
    (out * weight).sum().backward()

    assert _rel_err(out.detach(), expected) <= 1e-9
    theirs = list(plain.parameters())
    scale = torch.cat([p.grad.flatten() for p in theirs if p.grad is not None]).norm().item()
    for p, q in zip(piped.parameters(), theirs):
        assert p.grad is not None and q.grad is not None
        assert _rel_err(p.grad, q.grad, scale * 1e-3) <= 1e-9
