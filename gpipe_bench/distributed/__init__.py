"""A second engine for the tables: PyTorch's ``torch.distributed.pipelining``, one process per stage.

We do not write our own distributed runtime: stages, schedules (GPipe, 1F1B,
interleaved) and point-to-point transfers are PyTorch's. This package builds
each rank's stage without materialising the whole model, and runs the rows'
micro-batches through the chosen schedule.
"""

from .stages import build_full, build_stage, materialize, stage_range

__all__ = ["build_full", "build_stage", "materialize", "stage_range"]
