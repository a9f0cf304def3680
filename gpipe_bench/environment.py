"""What a figure depends on besides the code: the host, its devices, the software, and a key naming the machine.

Every record carries :func:`environment`; results of different machines are
kept apart and never compared by :func:`hardware_key`. One description of a
host serves the records and the engine benchmark alike.

Several hosts: a distributed run launched over ``N`` hosts (torchrun's
``WORLD_SIZE / LOCAL_WORLD_SIZE``) is filed under ``N-hosts-<one host's key>``,
so a 2 x 4-GPU run never mixes with a single 4-GPU host's results.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, cast

import torch

from . import __version__, hostalloc

__all__ = ["environment", "hardware_key", "cpu_model", "usable_cores", "hosts", "now"]


def now() -> str:
    """The time, in UTC, to the second: records compare dates across time zones."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hosts() -> int:
    """Hosts of this launch: torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE; 1 outside a launch."""
    try:
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return 1
    return max(1, world // local) if local > 0 else 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = f.read()
    except OSError:
        info = ""
    # x86 says "model name"; some ARM kernels say "Hardware" or "Processor" instead.
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _git_commit() -> Optional[str]:
    repo = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _cuda_names(devices: Sequence[str]) -> Dict[str, str]:
    """Name of each CUDA device in ``devices`` (by the device string as given)."""
    names: Dict[str, str] = {}
    for spec in devices:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError, ValueError):
            continue
        if device.type != "cuda" or not torch.cuda.is_available():
            continue
        index = device.index if device.index is not None else torch.cuda.current_device()
        names[str(spec)] = torch.cuda.get_device_name(index)
    return names


def _cudnn_version() -> Optional[int]:
    version = cast(Callable[[], Optional[int]], torch.backends.cudnn.version)  # untyped in torch's stubs
    return version()


def environment(devices: Sequence[str]) -> Dict[str, Any]:
    """Everything about this machine and software that a figure measured on ``devices`` depends on."""
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": _cudnn_version() if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "devices": [str(d) for d in devices],
        "device_names": _cuda_names(devices),
        # Every visible GPU, used or not: the machine, which the hardware key names.
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "gpipe_bench": __version__,
        "git_commit": _git_commit(),
        "date": now(),
        "hosts": hosts(),
        "host_allocator": hostalloc.current(),
    }


def _slug(text: str, limit: int = 60) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:limit].rstrip("-") or "unknown"


def _used_cuda(env: Mapping[str, Any]) -> bool:
    return bool(env.get("device_names")) or any(str(d).split(":")[0] == "cuda" for d in env.get("devices") or [])


def hardware_key(env: Mapping[str, Any]) -> str:
    """A slug of the machine(s) an environment describes; see :func:`_host_key`. ``N-hosts-`` first for a multi-host run."""
    key = _host_key(env)
    count = env.get("hosts") or 1
    return f"{int(count)}-hosts-{key}" if int(count) > 1 else key


def _host_key(env: Mapping[str, Any]) -> str:
    """A slug of the machine an environment describes, e.g. ``cpu-2-amd-epyc-7b13`` or ``8x-nvidia-tesla-p40``.

    GPU runs are named by every GPU the machine showed (not only those the row
    used), so naive-1 and pipeline-8 measured on one 8-GPU machine share a key
    and their speedup is meaningful. CPU runs are named by the cores the process
    could use and the CPU model. Only ``[a-z0-9-]`` (and ``_`` between GPU
    kinds), stable for a given machine.
    """
    if _used_cuda(env):
        names = [str(n) for n in env.get("gpus") or []] or [str(n) for n in (env.get("device_names") or {}).values()]
        if names:
            counts: Dict[str, int] = {}
            for name in names:
                counts[name] = counts.get(name, 0) + 1
            parts = []
            for name, n in counts.items():
                slug = _slug(name)
                if env.get("hip") is None and not slug.startswith("nvidia"):
                    slug = f"nvidia-{slug}"
                parts.append(f"{n}x-{slug}")
            return "_".join(parts)
        return "gpu-unknown"
    cores = env.get("usable_cores") or env.get("cpu_count") or 0
    return f"cpu-{int(cores)}-{_slug(str(env.get('cpu_model') or 'unknown'))}"
