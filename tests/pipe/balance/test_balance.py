"""balance_by_time / balance_by_size: results, no side effects on the model, errors, meta."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.pipe.balance import balance_by_size, balance_by_time, profile
from gpipe_bench.pipe.balance.profile import profile_sizes

CPU = torch.device("cpu")
# Short: a tiny model runs many rounds in this time even on a busy 2-core host.
TIMEOUT = 0.05


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.Linear(16, 4),
    )
    # Flags the profiler must leave alone: a frozen parameter, a layer in eval.
    model[4].bias.requires_grad_(False)
    model[5].eval()
    return model


def snapshot(model: nn.Module) -> Dict[str, Any]:
    return {
        "params": {n: (p.detach().clone(), p.device, p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "buffers": {n: (b.clone(), b.device) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: Dict[str, Any]) -> None:
    for name, p in model.named_parameters():
        value, device, requires_grad, _ = before["params"][name]
        assert p.device == device, name
        assert torch.equal(p.detach(), value), name
        assert p.requires_grad == requires_grad, name
        assert p.grad is None, name
    for name, b in model.named_buffers():
        value, device = before["buffers"][name]
        assert b.device == device, name
        assert torch.equal(b, value), name  # running_mean/var and num_batches_tracked
    for name, m in model.named_modules():
        assert m.training == before["training"][name], name


def check_balance(balance: List[int], model: nn.Sequential, partitions: int) -> None:
    assert len(balance) == partitions
    assert all(isinstance(b, int) and b >= 1 for b in balance)
    assert sum(balance) == len(model)


# --- results and no side effects -------------------------------------------------


def test_time_leaves_model_unchanged() -> None:
    model = small_model()
    before = snapshot(model)
    sample = torch.randn(6, 8)
    sample_before = sample.clone()
    rng_before = torch.get_rng_state()

    balance = balance_by_time(3, model, sample, timeout=TIMEOUT, device="cpu")

    check_balance(balance, model, 3)
    assert_unchanged(model, before)
    assert torch.equal(sample, sample_before)  # in-place ReLU never reached the caller's tensor
    assert torch.equal(torch.get_rng_state(), rng_before)  # dropout drew from a forked stream


def test_size_leaves_model_unchanged() -> None:
    model = small_model()
    before = snapshot(model)
    batch = torch.randn(12, 8)
    batch_before = batch.clone()
    rng_before = torch.get_rng_state()

    balance = balance_by_size(3, model, batch, chunks=4, device="cpu")

    check_balance(balance, model, 3)
    assert_unchanged(model, before)
    assert torch.equal(batch, batch_before)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_model_in_eval_mode_and_under_no_grad() -> None:
    model = small_model().eval()
    before = snapshot(model)
    with torch.no_grad():
        check_balance(balance_by_time(2, model, torch.randn(4, 8), timeout=TIMEOUT, device=CPU), model, 2)
        check_balance(balance_by_size(2, model, torch.randn(4, 8), device=CPU), model, 2)
    assert_unchanged(model, before)


def test_existing_grads_are_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    balance_by_time(2, model, torch.randn(3, 4), timeout=TIMEOUT, device="cpu")
    balance_by_size(2, model, torch.randn(3, 4), device="cpu")
    after = [p.grad for p in model.parameters()]
    assert all(a is not None and torch.equal(a, g) for a, g in zip(after, grads))


class Split(nn.Module):
    """Tensor in, tuple out."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x, x.square()


class Mix(nn.Module):
    """Tuple in, tuple out, with a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, xs: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        a, b = xs
        return self.linear(a) + b, b


class WithMask(nn.Module):
    """Carries an integer tensor along: it must not be made to require grad."""

    def forward(self, xs: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        a, b = xs
        mask = (b > 0).long()
        return a * mask, mask


class Join(nn.Module):
    """Tuple in, tensor out."""

    def forward(self, xs: Tuple[Tensor, Tensor]) -> Tensor:
        a, mask = xs
        assert not mask.is_floating_point()
        return a + mask


def test_tuple_passing_layers() -> None:
    model = nn.Sequential(nn.Linear(8, 8), Split(), Mix(), WithMask(), Join(), nn.Linear(8, 2))
    before = snapshot(model)
    sample = torch.randn(4, 8)
    check_balance(balance_by_time(3, model, sample, timeout=TIMEOUT, device="cpu"), model, 3)
    check_balance(balance_by_size(3, model, sample, chunks=2, device="cpu"), model, 3)
    assert_unchanged(model, before)


def test_tuple_input() -> None:
    model = nn.Sequential(Mix(), Mix(), WithMask(), Join())
    sample = (torch.randn(4, 8), torch.randn(4, 8))
    check_balance(balance_by_time(2, model, sample, timeout=TIMEOUT, device="cpu"), model, 2)
    check_balance(balance_by_size(2, model, sample, chunks=2, device="cpu"), model, 2)


_STASH: Dict[str, Tensor] = {}


class Stash(nn.Module):
    """Stand-in for a skippable stash: hands a tensor to a later layer out of band."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        _STASH["skip"] = self.linear(x)
        return x


class Pop(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x + _STASH.pop("skip")


def test_out_of_band_skip_tensors() -> None:
    # The popped tensor is still attached to the stashing layer's graph, which
    # that layer's own backward has already freed; profiling must not walk it.
    model = nn.Sequential(Stash(), nn.Linear(8, 8), Pop(), nn.Linear(8, 2))
    check_balance(balance_by_time(2, model, torch.randn(4, 8), timeout=TIMEOUT, device="cpu"), model, 2)
    check_balance(balance_by_size(2, model, torch.randn(4, 8), device="cpu"), model, 2)
    assert not _STASH


def test_skippable_layers() -> None:
    from gpipe_bench.pipe import skip  # an import failure of our own module is a failure, never a skip

    @skip.skippable(stash=["identity"])
    class Fork(nn.Module):
        def forward(self, x: Tensor) -> Any:
            yield skip.stash("identity", x)
            return x

    @skip.skippable(pop=["identity"])
    class Merge(nn.Module):
        def forward(self, x: Tensor) -> Any:
            identity = yield skip.pop("identity")
            return x + identity

    model = nn.Sequential(nn.Linear(8, 8), Fork(), nn.Linear(8, 8), nn.ReLU(), Merge(), nn.Linear(8, 2))
    check_balance(balance_by_time(3, model, torch.randn(4, 8), timeout=TIMEOUT, device="cpu"), model, 3)
    check_balance(balance_by_size(3, model, torch.randn(4, 8), device="cpu"), model, 3)


class FakeClock:
    """A clock that only the layers move: the profiler reads it instead of the host's.

    Each :class:`Slow` layer advances it by its declared cost per call, which
    dwarfs the real nanoseconds of the other layers; so the measured costs,
    and the balance they give, do not depend on how busy the host is.
    """

    def __init__(self) -> None:
        self.offset_ns = 0

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FakeClock":
        return self  # the profiler times copies of the layers: they must move this clock

    def perf_counter_ns(self) -> int:
        return time.perf_counter_ns() + self.offset_ns

    def perf_counter(self) -> float:
        return self.perf_counter_ns() / 1e9


class Slow(nn.Module):
    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.ns = clock, int(seconds * 1e9)
        self.linear = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        self.clock.offset_ns += self.ns
        out: Tensor = self.linear(x)
        return out


def test_time_isolates_a_slow_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(profile, "time", clock)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), Slow(clock, 1.0), nn.Linear(8, 8), nn.Tanh())
    assert balance_by_time(3, model, torch.randn(4, 8), timeout=0.2, device="cpu") == [2, 1, 2]
    assert clock.offset_ns > 0


class Bulky(nn.Module):
    """A cheap computation carrying a large parameter (think of a big embedding table)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.table = nn.Parameter(torch.zeros(100_000))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.linear(x)
        return out


def test_size_isolates_a_large_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Bulky(), nn.Linear(8, 8), nn.ReLU())
    assert balance_by_size(3, model, torch.randn(4, 8), device="cpu") == [2, 1, 2]


# --- what balance_by_size counts -------------------------------------------------


def test_size_counts_saved_tensors_once_and_outputs() -> None:
    class ExpSquare(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            y = x.exp()  # saves its result y
            return y * y  # saves y twice (as both operands)

    rows, features = 3, 8
    sizes = profile_sizes(nn.Sequential(ExpSquare()), torch.randn(rows, features), 1, 2.0, CPU)
    one = rows * features * 4
    assert sizes == [2 * one]  # y once + the output


def test_size_skips_inputs_views_and_in_place_outputs() -> None:
    model = nn.Sequential(nn.ReLU(), nn.ReLU(inplace=True), nn.Flatten(), nn.Identity())
    sizes = profile_sizes(model, torch.randn(5, 2, 4), 1, 2.0, CPU)
    one = 5 * 8 * 4
    # ReLU: its output (also what it saves). In-place ReLU, Flatten (a view)
    # and Identity allocate nothing new.
    assert sizes == [one, 0, 0, 0]


def test_size_parameters_and_micro_batch() -> None:
    layer = nn.Linear(8, 16)  # saves its input and weight: neither is new memory
    params = (8 * 16 + 16) * 4
    sizes = profile_sizes(nn.Sequential(layer), torch.randn(7, 8), 2, 3.0, CPU)
    rows = 4  # ceil(7 / 2), the first micro-batch torch.chunk would cut
    assert sizes == [rows * 16 * 4 + 3 * params]


def test_size_is_device_independent_meta_matches_cpu() -> None:
    def build() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )

    cpu_sizes = profile_sizes(build(), torch.randn(8, 3, 8, 8), 2, 2.0, CPU)
    with torch.device("meta"):
        meta_model = build()
    meta_sizes = profile_sizes(meta_model, torch.empty(8, 3, 8, 8, device="meta"), 2, 2.0, torch.device("meta"))
    assert meta_sizes == cpu_sizes
    assert all(s > 0 for s in cpu_sizes[:4])


def test_balance_by_size_on_meta() -> None:
    with torch.device("meta"):
        model = nn.Sequential(
            nn.Linear(32, 1024), nn.ReLU(), nn.BatchNorm1d(1024), nn.Linear(1024, 32), nn.Linear(32, 32)
        )
    before_devices = [p.device for p in model.parameters()]
    balance = balance_by_size(3, model, torch.empty(64, 32, device="meta"), chunks=4, device="meta")
    check_balance(balance, model, 3)
    assert [p.device for p in model.parameters()] == before_devices
    assert all(p.grad is None for p in model.parameters())


# --- errors ----------------------------------------------------------------------


def test_cuda_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = small_model()
    with pytest.raises(ValueError, match=r"device 'cuda' .*CUDA is not available; pass device='cpu'") as info:
        balance_by_time(2, model, torch.randn(4, 8))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"balance_by_size: device 'cuda:1' .*pass device='cpu'"):
        balance_by_size(2, model, torch.randn(4, 8), device="cuda:1")
    with pytest.raises(ValueError, match=r"device 'cuda:0' .*pass device='cpu'"):
        balance_by_size(2, model, torch.randn(4, 8), device=0)


@pytest.mark.parametrize("partitions", [0, 8])
def test_partitions_out_of_range(partitions: int) -> None:
    model = small_model()  # 7 layers
    message = rf"partitions must be between 1 and the number of layers \(7\), got {partitions}"
    with pytest.raises(ValueError, match=message):
        balance_by_time(partitions, model, torch.randn(4, 8), timeout=TIMEOUT, device="cpu")
    with pytest.raises(ValueError, match=message):
        balance_by_size(partitions, model, torch.randn(4, 8), device="cpu")


def test_chunks_below_one() -> None:
    with pytest.raises(ValueError, match="chunks must be at least 1, got 0"):
        balance_by_size(2, small_model(), torch.randn(4, 8), chunks=0, device="cpu")


def test_negative_param_scale() -> None:
    with pytest.raises(ValueError, match="param_scale must be non-negative"):
        balance_by_size(2, small_model(), torch.randn(4, 8), param_scale=-1.0, device="cpu")


def test_not_sequential() -> None:
    with pytest.raises(TypeError, match="must be nn.Sequential, got Linear"):
        balance_by_time(1, nn.Linear(2, 2), torch.randn(1, 2), device="cpu")  # type: ignore[arg-type]


def test_bad_input_and_output_types() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Tensor or a non-empty tuple of Tensors, got list"):
        balance_by_size(1, model, [torch.randn(1, 2)], device="cpu")  # type: ignore[arg-type]

    class ReturnsDict(nn.Module):
        def forward(self, x: Tensor) -> Dict[str, Tensor]:
            return {"x": x}

    with pytest.raises(TypeError, match="output of layer '0'"):
        balance_by_size(1, nn.Sequential(ReturnsDict()), torch.randn(1, 2), device="cpu")


def test_default_device_is_cuda() -> None:
    import inspect

    for fn in (balance_by_time, balance_by_size):
        default = inspect.signature(fn).parameters["device"].default
        assert default == torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profiles_leave_cpu_model_on_cpu() -> None:
    model = small_model()
    before = snapshot(model)
    check_balance(balance_by_time(3, model, torch.randn(6, 8), timeout=TIMEOUT), model, 3)
    check_balance(balance_by_size(3, model, torch.randn(6, 8), chunks=2), model, 3)
    assert_unchanged(model, before)
    cpu_sizes = profile_sizes(model, torch.randn(6, 8), 2, 2.0, CPU)
    cuda_sizes = profile_sizes(model, torch.randn(6, 8), 2, 2.0, torch.device("cuda"))
    assert cpu_sizes == cuda_sizes
