"""Which devices a run uses: ``--devices``, the defaults, sharing, and CPU virtual devices.

A pipeline row needs one device per partition. Users name them the way
PyTorch tools do (``0,1,2,3``, ``cuda:0,cuda:1``, ``cpu:0,cpu:1``), may repeat
one (``cuda:0*8`` is eight partitions on one GPU: that measures the engine's
overhead, not parallel speedup, and the plan says so), or give nothing: then
every CUDA device is used, and a machine without CUDA gets virtual CPU devices,
one worker thread each, so pipelining is still observable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .errors import HarnessError
from .pipe.copy import worker_groups

__all__ = ["DevicePlan", "available_host_bytes", "memory_slots", "parse", "resolve"]

_DEVICE = re.compile(r"^(?:(cuda|cpu)(?::(\d+))?|(\d+))$")


@dataclass(frozen=True)
class DevicePlan:
    """The devices of one run, one per partition (or the single device of a plain model)."""

    devices: List[str]
    virtual_cpu: bool  # no CUDA: partitions run on virtual CPU devices
    shared: bool  # some device holds several partitions: overhead, not parallel speedup
    note: str  # one line for the user when the plan is not the obvious one ("" otherwise)


def parse(spec: str) -> List[str]:
    """Parse ``--devices``: comma-separated ``N``, ``cuda:N``, ``cpu``, ``cpu:N``, each optionally ``*COUNT``."""
    devices: List[str] = []
    for item in (part.strip() for part in spec.split(",")):
        name, _, times = item.partition("*")
        match = _DEVICE.match(name.strip())
        if not match or (times and not times.strip().isdigit()) or (times and int(times) < 1):
            raise HarnessError(
                f"{item!r} is not a device; use e.g. '0,1', 'cuda:0,cuda:1', 'cuda:0*4' or 'cpu:0,cpu:1'",
                param="--devices",
            )
        kind, index, bare = match.groups()
        device = f"cuda:{bare}" if bare is not None else (f"{kind}:{index}" if index is not None else kind)
        devices += [device] * (int(times) if times else 1)
    return devices


def _check_available(devices: List[str]) -> None:
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        return
    if not torch.cuda.is_available():
        raise HarnessError(
            f"{cuda[0]} asked for, but this machine has no CUDA device; use virtual CPU devices such as "
            "'cpu:0,cpu:1' (or leave --devices out)",
            param="--devices",
        )
    count = torch.cuda.device_count()
    for d in cuda:
        index = int(d.split(":")[1]) if ":" in d else 0
        if index >= count:
            raise HarnessError(
                f"{d} asked for, but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})",
                param="--devices",
            )


def resolve(spec: Optional[str], partitions: int) -> DevicePlan:
    """Devices for ``partitions`` partitions, from ``--devices`` or the defaults."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    if spec is not None:
        given = parse(spec)
        _check_available(given)
        if len(given) < partitions:
            raise HarnessError(
                f"{len(given)} device(s) given for {partitions} partitions; give {partitions} "
                f"(repeats allowed, e.g. '{given[0]}*{partitions}')",
                param="--devices",
            )
        devices = given[:partitions]
        virtual = all(d.startswith("cpu") for d in devices)
    elif torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count < partitions:
            raise HarnessError(
                f"{partitions} partitions but only {count} CUDA device(s); pass --devices with repeats, e.g. "
                f"--devices cuda:0*{partitions} (that measures engine overhead, not parallel speedup)"
            )
        devices, virtual = [f"cuda:{j}" for j in range(partitions)], False
    else:
        devices, virtual = [f"cpu:{j}" for j in range(partitions)], True
    shared = len(set(devices)) < len(devices) or (devices == ["cpu"] * len(devices) and len(devices) > 1)
    note = ""
    if shared:
        note = "devices repeat: partitions share a device, so this measures engine overhead, not parallel speedup"
    elif virtual and partitions > 1:
        note = f"virtual CPU devices: {partitions} partitions on {partitions} worker threads of this host's cores"
    return DevicePlan(devices, virtual, shared, note)


def memory_slots(devices: Sequence[str]) -> Tuple[List[str], List[int]]:
    """The distinct devices (in order of first use) and, per partition, the index of its device.

    Partitions on one device share its memory, so figures are per device: the engine's own grouping of
    partitions into workers (:func:`gpipe_bench.pipe.copy.worker_groups`), named as strings.
    """
    try:
        parsed = [torch.device(d) for d in devices]
    except RuntimeError:  # not devices of this process (a launch's ranks: 'rank0', 'rank1'): one slot each name
        names = list(dict.fromkeys(devices))
        return names, [names.index(d) for d in devices]
    keys, slots = worker_groups(parsed)
    return [str(k) for k in keys], slots


def available_host_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux); None where unknown.

    The memory table's guard against a row that cannot fit and the planner's default
    cap on a CPU both read it here.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
