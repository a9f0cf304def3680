"""Deferred BatchNorm: running statistics of the whole mini-batch, not of each micro-batch.

With micro-batches, a plain BatchNorm would update its running statistics once
per micro-batch, from micro-batch statistics: ``chunks`` momentum steps per
training step, each from a noisier estimate. :class:`DeferredBatchNorm`
normalises each micro-batch with its own statistics (which is what GPipe
computes) but only *accumulates* them; the engine commits them once per
mini-batch, giving exactly the running statistics a plain BatchNorm would have
after seeing the whole mini-batch.

Accumulation merges per-micro-batch means and sums of squared deviations
(Chan et al.'s pairwise update) rather than raw sums of squares, so the
committed variance matches a one-shot computation to rounding even in float32.
Recomputation does not accumulate: each micro-batch counts once.
"""

from __future__ import annotations

from typing import Optional, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .checkpoint import is_recomputing

__all__ = ["DeferredBatchNorm"]

M = TypeVar("M", bound=nn.Module)


class DeferredBatchNorm(_BatchNorm):
    """A BatchNorm whose running statistics are committed once per mini-batch."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        chunks: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        self.chunks = chunks
        # Not persistent: state dicts stay those of a plain BatchNorm.
        self.register_buffer("acc_mean", torch.zeros(num_features), persistent=False)
        self.register_buffer("acc_m2", torch.zeros(num_features), persistent=False)
        self.acc_count = 0

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _buffer(self, name: str) -> Tensor:
        return cast(Tensor, getattr(self, name))

    @torch.no_grad()
    def _accumulate(self, input: Tensor) -> None:
        acc_mean, acc_m2 = self._buffer("acc_mean"), self._buffer("acc_m2")
        dims = [d for d in range(input.dim()) if d != 1]
        x = input.detach().to(acc_mean.dtype)
        count = x.numel() // x.size(1)
        # One fused reduction: ``(x - mean).pow(2)`` made two full-size temporaries per call.
        var, mean = torch.var_mean(x, dims, correction=0)
        m2 = var * count
        total = self.acc_count + count
        delta = mean - acc_mean
        acc_mean.add_(delta * (count / total))
        acc_m2.add_(m2 + delta.pow(2) * (self.acc_count * count / total))
        self.acc_count = total

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the accumulated mini-batch statistics into the running ones, as one BatchNorm step."""
        if self.acc_count == 0:
            return
        acc_mean, acc_m2 = self._buffer("acc_mean"), self._buffer("acc_m2")
        tracked = self._buffer("num_batches_tracked")
        tracked.add_(1)
        factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        var = acc_m2 / max(self.acc_count - 1, 1)
        self._buffer("running_mean").mul_(1 - factor).add_(acc_mean, alpha=factor)
        self._buffer("running_var").mul_(1 - factor).add_(var, alpha=factor)
        acc_mean.zero_()
        acc_m2.zero_()
        self.acc_count = 0

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        if not is_recomputing():
            self._accumulate(input)
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @classmethod
    def convert_deferred_batch_norm(cls, module: M, chunks: int = 1) -> M:
        """Replace every BatchNorm in ``module`` (recursively) by a deferred one sharing its tensors."""
        if isinstance(module, _BatchNorm) and module.track_running_stats and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine, chunks)
            if module.affine:
                converted.weight = module.weight
                converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            like = cast(Tensor, module.running_mean)
            converted.acc_mean = converted._buffer("acc_mean").to(like)
            converted.acc_m2 = converted._buffer("acc_m2").to(like)
            converted.train(module.training)
            return cast(M, converted)
        for name, child in module.named_children():
            module.add_module(name, cls.convert_deferred_batch_norm(child, chunks))
        return module
