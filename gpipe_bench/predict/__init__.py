"""Predict a row's speed without running it: per-layer costs, then the engine's schedule simulated.

Why: the memory table already answers "will it fit" from the ``meta`` device.
Users ask the same of speed (how many micro-batches, which balance, what
speedup to expect) on hardware they may not have. The answer here is built
from two independent parts, each testable on its own:

- :mod:`.count` and :mod:`.hardware`: what each layer costs, either counted on
  ``meta`` (FLOPs and bytes per operator) and turned into seconds by a
  roofline of a hardware preset, or timed on the device at hand
  (:mod:`.measured`);
- :mod:`.simulate`: the schedules as they run (our engine's fill-drain clocks
  with recomputation, naive model parallelism, torch's GPipe / 1F1B /
  interleaved 1F1B), event by event on devices, links and the host.
"""
