"""precision.py: what each precision does to a step, which devices run it, and fp16's counted skipped steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gpipe_bench import precision
from gpipe_bench.errors import HarnessError


def test_a_cpu_runs_fp32_and_bf16_a_gpu_all_four_bf16_from_ampere() -> None:
    assert precision.runnable("cpu") == ("fp32", "bf16")
    assert precision.runnable("cuda") == precision.PRECISIONS == ("fp32", "tf32", "bf16", "fp16")
    assert precision.runnable("cuda", bf16=False) == ("fp32", "tf32", "fp16")
    for name in ("fp32", "bf16"):
        precision.check(name, "cpu")


@pytest.mark.parametrize(
    ("name", "device", "bf16", "words"),
    [
        (
            "fp16",
            "cpu",
            True,
            "pipeline-2: a CPU cannot run --precision fp16 (CPU autocast computes in bf16 only); "
            "use one of: fp32, bf16",
        ),
        ("tf32", "cpu", True, "a CPU cannot run --precision tf32"),
        (
            "bf16",
            "cuda",
            False,
            "cannot run --precision bf16 (bf16 arithmetic came with Ampere GPUs); use one of: fp32, tf32, fp16",
        ),
    ],
)
def test_a_precision_the_device_cannot_run_is_one_line_naming_those_it_can(
    name: str, device: str, bf16: bool, words: str
) -> None:
    with pytest.raises(HarnessError) as refused:
        precision.check(name, device, bf16, where="pipeline-2" if device == "cpu" and name == "fp16" else "")
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert refused.value.param == "--precision"


def test_a_preset_is_named_in_the_refusal() -> None:
    with pytest.raises(HarnessError, match="^v100 cannot run --precision bf16"):
        precision.check("bf16", "cuda", bf16=False, device="v100")


def test_only_bf16_and_fp16_autocast_and_halve_the_activations() -> None:
    assert [precision.autocast_dtype(p) for p in precision.PRECISIONS] == [None, None, torch.bfloat16, torch.float16]
    assert [precision.element_bytes(p) for p in precision.PRECISIONS] == [4, 4, 2, 2]


def test_the_forward_pass_autocasts_and_the_step_outside_it_does_not() -> None:
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with precision.forward_pass("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32
    for name in ("fp32", "tf32"):
        with precision.forward_pass(name, "cpu"):
            assert layer(x).dtype == torch.float32


def test_tf32_switches_both_flags_for_the_whole_step_and_restores_them() -> None:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with precision.whole_step("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)
    with precision.whole_step("fp32"):  # PyTorch's defaults, untouched
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)


def test_the_autocast_wrapper_runs_every_forward_under_the_precision() -> None:
    inner = nn.Linear(4, 4)
    wrapped = precision.Autocast(inner, "bf16", "cpu")
    x = torch.randn(2, 4, requires_grad=True)
    out = wrapped(x)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    out.float().sum().backward()  # the backward outside autocast: gradients in the parameters' dtype
    assert inner.weight.grad is not None and inner.weight.grad.dtype == torch.float32


def test_outside_fp16_the_loss_scale_is_the_plain_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    x = torch.randn(3, 4)
    scale = precision.LossScale("bf16", "cpu")
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    scale.backward(model(x).sum())
    scale.step(opt)
    twin(x).sum().backward()
    twin_opt.step()
    assert torch.equal(model.weight, twin.weight)
    assert scale.record() == {} and (scale.steps, scale.skipped) == (1, 0)


def test_fp16_skips_an_overflowing_step_counts_it_and_halves_the_scale() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scale = precision.LossScale("fp16", "cpu")  # torch's GradScaler works on a CPU too; the harness refuses fp16 there
    assert scale.scaler is not None
    first_scale = scale.scaler.get_scale()
    x = torch.randn(3, 4)
    scale.backward(model(x).sum())
    before = model.weight.detach().clone()
    model.weight.grad[0, 0] = float("inf")  # type: ignore[index]
    scale.step(opt)
    assert torch.equal(model.weight, before)  # skipped
    opt.zero_grad()
    scale.backward(model(x).sum())
    scale.step(opt)
    assert not torch.equal(model.weight, before)  # taken
    assert scale.record() == {"loss_scale": {"steps": 2, "skipped_steps": 1, "final": first_scale / 2}}


def test_a_caller_that_runs_fewer_precisions_names_its_own() -> None:
    with pytest.raises(HarnessError, match=r"p40 cannot run --precision bf16 .*use one of: fp32, tf32$"):
        precision.check("bf16", "cuda", bf16=False, device="p40", allowed=("fp32", "tf32"))
