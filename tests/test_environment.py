"""environment.py: what a figure depends on, and the key that keeps machines apart."""

from __future__ import annotations

import json
import re

import pytest

import gpipe_bench
from gpipe_bench.environment import environment, hardware_key, hosts
from helpers import EPYC, P40, SLUG

# -- hardware keys -------------------------------------------------------------------------------------------------


def test_hardware_keys() -> None:
    assert hardware_key(P40) == "8x-nvidia-tesla-p40"
    assert hardware_key(EPYC) == "cpu-2-amd-epyc-7b13"
    h100 = {"devices": ["cuda:0"], "gpus": ["NVIDIA H100 80GB HBM3"], "hip": None}
    assert hardware_key(h100) == "1x-nvidia-h100-80gb-hbm3"


def test_hardware_keys_are_distinct_and_safe() -> None:
    envs = [
        P40,
        {**P40, "gpus": ["Tesla P40"] * 4},
        {**P40, "gpus": ["Tesla V100-SXM2-16GB"] * 8},
        {**P40, "gpus": ["NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB"]},
        {**P40, "devices": ["cpu"], "device_names": {}},  # a CPU run on a GPU machine names the CPU
        EPYC,
        {**EPYC, "usable_cores": 16},
        {**EPYC, "cpu_model": "Intel(R) Xeon(R) Platinum 8480+"},
        {**EPYC, "cpu_model": "../../we?ird/ \\ name\u2122"},
        {},
    ]
    keys = [hardware_key(env) for env in envs]
    assert len(set(keys)) == len(keys), keys
    for key in keys:
        assert SLUG.match(key), key
        assert len(key) <= 100


def test_hardware_key_ignores_which_gpus_a_row_used() -> None:
    """naive-1 on one GPU and pipeline-8 on eight, same machine: one key, so their speedup is meaningful."""
    one = {**P40, "devices": ["cuda:0"], "device_names": {"cuda:0": "Tesla P40"}}
    eight = {
        **P40,
        "devices": [f"cuda:{i}" for i in range(8)],
        "device_names": {f"cuda:{i}": "Tesla P40" for i in range(8)},
    }
    assert hardware_key(one) == hardware_key(eight)


def test_hardware_key_of_this_machine_is_stable() -> None:
    first = hardware_key(environment(["cpu"]))
    second = hardware_key(environment(["cpu:0", "cpu:1"]))
    assert first == second and first.startswith("cpu-") and SLUG.match(first)


# -- environment ---------------------------------------------------------------------------------------------------


def test_environment_keys() -> None:
    env = environment(["cpu:0", "cpu:1"])
    expected = {
        "torch",
        "cuda",
        "cudnn",
        "python",
        "platform",
        "hostname",
        "cpu_model",
        "cpu_count",
        "usable_cores",
        "threads",
        "devices",
        "device_names",
        "gpus",
        "gpipe_bench",
        "git_commit",
        "date",
        "hosts",
    }
    assert expected <= set(env)
    assert env["devices"] == ["cpu:0", "cpu:1"] and env["device_names"] == {}
    assert env["gpipe_bench"] == gpipe_bench.__version__
    assert isinstance(env["cpu_model"], str) and env["cpu_model"]
    assert 1 <= env["usable_cores"] <= env["cpu_count"]
    assert env["threads"] >= 1
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40,64}", env["git_commit"])
    json.dumps(env)  # goes into every record


def test_a_multi_host_run_is_kept_apart_from_one_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 x 4-GPU distributed run was filed under rank 0's host: it mixed with a single 4-GPU host's results."""
    four = {**P40, "gpus": ["Tesla P40"] * 4}
    assert hardware_key({**four, "hosts": 2}) == "2-hosts-4x-nvidia-tesla-p40"
    assert hardware_key({**four, "hosts": 1}) == hardware_key(four) == "4x-nvidia-tesla-p40"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert hosts() == 2 and environment([])["hosts"] == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert hosts() == 1
