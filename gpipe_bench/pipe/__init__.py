"""A GPipe engine for current PyTorch with torchgpipe 0.0.7's public API.

``from gpipe_bench.pipe import GPipe`` replaces ``from torchgpipe import GPipe``.
This package depends on torch alone.
"""

from .checkpoint import is_checkpointing, is_recomputing
from .gpipe import GPipe
from .observe import Observer, StepRecord, observing

__all__ = ["GPipe", "Observer", "StepRecord", "is_checkpointing", "is_recomputing", "observing"]
