"""hardware.py: the packaged presets load and say where their numbers come from; bad files and names fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpipe_bench.errors import HarnessError
from gpipe_bench.predict import hardware
from gpipe_bench.predict.hardware import Link, Rate, filter_of, load, names
from gpipe_bench.report.predicted import presets_table


def test_the_packaged_presets_load_with_sources() -> None:
    assert {"p40", "v100", "a100", "h100", "h200", "epyc-2vcpu"} <= set(names())
    for name in names():
        preset = load(name)
        assert preset.name == name
        assert preset.sources and all("http" in s or "Measured" in s for s in preset.sources)
        assert preset.kind in hardware.DEVICE_KINDS
        assert preset.fp32_flops > 0 and preset.memory_bandwidth > 0 and preset.memory > 0
        assert preset.default_link in preset.links
        assert preset.link() is preset.links[preset.default_link]
        hash(preset)  # usable as a cache key


def test_published_figures() -> None:
    p40 = load("p40")
    assert p40.tf32_flops is None and not p40.tf32_convs
    assert p40.conv_flops() == p40.fp32_flops == pytest.approx(11.76e12)
    assert p40.memory_bandwidth == pytest.approx(346e9)
    a100 = load("a100")
    assert a100.conv_flops() == a100.tf32_flops == pytest.approx(156e12)
    assert a100.fp32_flops == pytest.approx(19.5e12)
    h100, h200 = load("h100"), load("h200")
    assert h100.tf32_flops == h200.tf32_flops == pytest.approx(494.7e12)  # dense, not the sparse 989
    assert h200.memory_bandwidth > h100.memory_bandwidth
    assert load("epyc-2vcpu").kind == "cpu" and load("epyc-2vcpu").links["host"].bandwidth == float("inf")


def test_the_cpu_preset_is_named_for_its_machine_and_points_to_measured_costs() -> None:
    epyc = load("epyc-2vcpu")
    assert "cpu" not in names()  # no preset claims to be whichever CPU runs the prediction
    assert "AMD EPYC" in epyc.description and "--costs measured" in epyc.description
    listing = presets_table(hardware.presets())
    assert "comments above" not in listing and "this machine" not in listing  # a source says which machine


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(HarnessError) as error:
        load("x")
    assert error.value.message == (
        f"unknown hardware 'x'; known: {', '.join(names())} (gpipe-bench predict --hardware list; for the CPU at "
        "hand, --costs measured)"
    )
    with pytest.raises(HarnessError, match="has no 'nvlink' link; it has: pcie"):
        load("p40").link("nvlink")


def test_link_seconds() -> None:
    assert Link("pcie", 10e9, 1e-5).seconds(1e9) == pytest.approx(0.1 + 1e-5)
    assert Link("host", float("inf"), 2e-5).seconds(1e12) == 2e-5  # shared memory: nothing copied


GOOD = """
presets:
  toy:
    description: a toy
    kind: gpu
    cores: 4
    fp32_flops: 1.0e+12
    tf32_flops: null
    tf32_convs: false
    memory_bandwidth: 1.0e+11
    memory: 1024
    launch: 1.0e-5
    links: {pcie: {bandwidth: 1.0e+10, latency: 1.0e-5}}
    default_link: pcie
    sources: ["made up"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "presets.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_presets_file_of_ones_own(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    assert names(path) == ["toy"]
    assert load("toy", path).fp32_flops == 1e12


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("fp32_flops: 1.0e+12", "fp32_flops: 1e12", "must be a number"),  # PyYAML reads 1e12 as a string
        ("memory: 1024", "memory: -1", "must be positive"),
        ("memory: 1024", "memory: .inf", "must be a number"),
        ("kind: gpu", "kind: tpu", "is not one of gpu, cpu"),
        ("tf32_convs: false", "tf32_convs: true", "tf32_flops is null"),
        ("default_link: pcie", "default_link: nvlink", "is not one of its links"),
        ('sources: ["made up"]', "sources: []", "sources must be"),
        ("    cores: 4\n", "", "missing fields \\['cores'\\]"),
        ("links: {pcie:", "links: {warp:", "link kind 'warp'"),
    ],
)
def test_bad_presets_are_harness_errors(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    with pytest.raises(HarnessError, match=message):
        load("toy", _write(tmp_path, GOOD.replace(old, new)))


RATES = """
rates:
  bench:
    source: a microbenchmark
    conv:
      1x1:    {forward: [1.0e-5, 0.5], backward_data: [1.0e-5, 0.4], backward_filter: [1.0e-5, 0.3]}
      3x3:    {forward: [2.0e-5, 1.5], backward_data: [2.0e-5, 1.4], backward_filter: [2.0e-5, 1.3]}
      larger: {forward: [0.0, 0.9], backward_data: [0.0, 0.8], backward_filter: [0.0, 0.7]}
    matmul: [5.0e-6, 0.85]
"""
MEASURED = RATES + GOOD.replace(
    "    launch: 1.0e-5\n",
    "    launch: 1.0e-5\n    rates: {cuda_cores: bench}\n    memory_share: 0.9\n    kernel_floor: 2.0e-6\n",
)


def test_a_preset_runs_at_the_rates_it_names(tmp_path: Path) -> None:
    preset = load("toy", _write(tmp_path, MEASURED))
    rates = preset.rates["cuda_cores"]
    assert rates.name == "bench" and rates.source == "a microbenchmark"
    assert rates.conv["3x3"]["backward_filter"] == Rate(2e-5, 1.3) and rates.matmul == Rate(5e-6, 0.85)
    assert rates.conv["1x1"]["forward"].seconds(1e12, 1e12) == pytest.approx(1e-5 + 2.0)
    assert (preset.memory_share, preset.kernel_floor, preset.conv_unit) == (0.9, 2e-6, "cuda_cores")
    assert [filter_of(taps) for taps in (1, 7, 9, 25)] == ["1x1", "3x3", "3x3", "larger"]
    (tmp_path / "bare").mkdir()
    bare = load("toy", _write(tmp_path / "bare", GOOD))  # the optional fields left out: the roofline as it is
    assert (dict(bare.rates), bare.memory_share, bare.kernel_floor) == ({}, 1.0, 0.0)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("rates: {cuda_cores: bench}", "rates: {cuda_cores: nope}", "'nope' is not one of the rates: bench"),
        ("rates: {cuda_cores: bench}", "rates: {warp_cores: bench}", "must map units"),
        ("memory_share: 0.9", "memory_share: 1.5", "at most 1"),
        ("matmul: [5.0e-6, 0.85]", "matmul: [5.0e-6]", "overhead seconds, share of peak"),
        ("      larger: {forward: [0.0, 0.9], ", "      larger: {", "must give every pass"),
        ("      1x1:    {forward", "      5x5:    {forward", "must give every filter group"),
    ],
)
def test_bad_rates_are_harness_errors(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in MEASURED
    with pytest.raises(HarnessError, match=message):
        load("toy", _write(tmp_path, MEASURED.replace(old, new)))


def test_presets_give_the_tensor_cores_half_precision_peak_where_there_is_one(tmp_path: Path) -> None:
    assert (load("p40").half_flops, load("p40").bf16) == (None, False)  # no tensor cores
    assert (load("v100").half_flops, load("v100").bf16) == (125e12, False)  # fp16 only
    for name, peak in (("a100", 312e12), ("h100", 989.4e12), ("h200", 989.4e12)):
        assert (load(name).half_flops, load(name).bf16) == (peak, True)
        assert load(name).half_flops == pytest.approx(2 * load(name).tf32_flops, rel=0.01)  # dense: twice TF32
    with pytest.raises(HarnessError, match="bf16 is true but half_flops is null"):
        load("toy", _write(tmp_path, GOOD.replace("    launch: 1.0e-5\n", "    launch: 1.0e-5\n    bf16: true\n")))
    (tmp_path / "flag").mkdir()
    with pytest.raises(HarnessError, match="bf16 must be true or false"):
        load(
            "toy",
            _write(
                tmp_path / "flag",
                GOOD.replace("    launch: 1.0e-5\n", "    launch: 1.0e-5\n    half_flops: 1.0e+12\n    bf16: 1\n"),
            ),
        )


# One preset's fields at the top level: what --hardware-file reads.
OWN = "\n".join(line[4:] for line in GOOD.splitlines() if line.startswith("    ")) + "\n"


def test_a_preset_file_of_ones_own_is_named_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "toy-gpu.yaml"
    path.write_text(OWN + "rates: {cuda_cores: deepbench-titanxp-fp32}\n", encoding="utf-8")
    preset = hardware.load_file(path)
    assert (preset.name, preset.fp32_flops, preset.rates["cuda_cores"].name) == (
        "toy-gpu",
        1e12,
        "deepbench-titanxp-fp32",
    )
    assert load(preset) is preset  # predict and plan take a name or a preset


@pytest.mark.parametrize(
    "text, message",
    [
        (
            OWN.replace("fp32_flops", "fp32_flop"),
            "toy.yaml: toy: unknown field 'fp32_flop' (did you mean 'fp32_flops'?)",
        ),
        (OWN.replace("memory: 1024", "memory: lots"), "toy.yaml: toy.memory must be a number, not 'lots'"),
        (OWN.replace("kind: gpu", "kind: tpu"), "toy.yaml: toy.kind 'tpu' is not one of gpu, cpu"),
        (OWN + "rates: {cuda_cores: nope}\n", "toy.rates.cuda_cores: 'nope' is not one of the rates"),
        ("toy:\n" + GOOD.split("toy:\n")[1], "the fields sit under 'toy'; write them at the top level"),
        ("kind: [gpu\n", "is not valid YAML"),
    ],
)
def test_a_bad_preset_file_is_one_line_charged_to_the_option(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(HarnessError) as error:
        hardware.load_file(path)
    assert message in error.value.message and error.value.param == "--hardware-file"
    assert "\n" not in error.value.message
    with pytest.raises(HarnessError, match="No such file or directory; give the path of a YAML file"):
        hardware.load_file(tmp_path / "missing.yaml")
