"""stream.py: on CPU every stream operation is a no-op on the CPU_STREAM sentinel."""

from __future__ import annotations

import torch

from gpipe_bench.pipe.stream import (
    CPU_STREAM,
    current_stream,
    new_stream,
    record_event,
    record_stream,
    use_stream,
    wait_event,
    wait_stream,
)


def test_cpu_streams_are_the_sentinel() -> None:
    cpu = torch.device("cpu")
    assert new_stream(cpu) is CPU_STREAM
    assert current_stream(cpu) is CPU_STREAM
    assert repr(CPU_STREAM) == "CPU_STREAM"


def test_cpu_operations_are_no_ops() -> None:
    x = torch.ones(2)
    with use_stream(CPU_STREAM):
        y = x * 2
    assert record_event(CPU_STREAM) is None
    wait_event(CPU_STREAM, None)
    wait_stream(CPU_STREAM, CPU_STREAM)
    record_stream(y, CPU_STREAM)
    assert torch.equal(y, torch.full((2,), 2.0))
