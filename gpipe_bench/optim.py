"""The one way a row's optimizer is built from its config (``settings.optimizer``).

Speed, memory and accuracy rows, on every engine, build their optimizer
here: ``name`` picks the class, ``lr`` and every other key are its arguments
(``momentum``, ``nesterov``, ``weight_decay``, ...). Four set-ups that each
read a different subset of the config (the speed rows ignored ``name``) were
four chances to measure something other than the config says.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping

import torch
from torch import Tensor, nn

from .errors import HarnessError

__all__ = ["OPTIMIZERS", "build", "model_state"]

OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
}


def build(spec: Mapping[str, Any], parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names (``{name: sgd, lr: 0.1, momentum: 0.9}``) over ``parameters``."""
    options = dict(spec)
    name = str(options.pop("name", "")).lower()
    if name not in OPTIMIZERS:
        raise HarnessError(f"settings.optimizer.name = {name!r}: not supported; use one of: {', '.join(OPTIMIZERS)}")
    options["lr"] = float(options.get("lr", 0.1))
    try:
        return OPTIMIZERS[name](list(parameters), **options)
    except (TypeError, ValueError) as error:
        raise HarnessError(
            f"settings.optimizer = {dict(spec)}: {name} rejects it ({error}); fix the optimizer's "
            "arguments in the config"
        ) from None


def model_state(parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer) -> List[Tensor]:
    """Gradients and optimizer buffers: model memory, which activation-memory figures leave out."""
    state = [p.grad for p in parameters if p.grad is not None]
    for per_param in optimizer.state.values():
        state += [v for v in per_param.values() if isinstance(v, Tensor)]
    return state
