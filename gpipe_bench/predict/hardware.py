"""Hardware presets for the speed predictor: peak rates, memory, links and host overhead per device kind.

Why presets and not a device query: the point of predicting is to answer for
hardware the user does not have (the published tables ran on eight Tesla
P40s). The figures live in ``hardware.yaml`` next to this module, each preset
with the spec sheets it was taken from, so a number can be checked and a new
card added without touching code. The file sits here rather than in
``gpipe_bench/configs/``, where every ``*.yaml`` is a benchmark table.

Units are SI throughout: FLOP/s, bytes/s, bytes, seconds. Link bandwidths
are per direction (what one transfer between two neighbours can use), not
the bidirectional totals spec sheets like to print.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml  # type: ignore[import-untyped, unused-ignore]

from .. import precision as precisions
from ..errors import HarnessError

__all__ = [
    "LINK_KINDS",
    "DEVICE_KINDS",
    "UNITS",
    "FILTERS",
    "PASSES",
    "PRESETS_FILE",
    "Link",
    "Rate",
    "Rates",
    "Hardware",
    "check_precision",
    "load",
    "load_file",
    "names",
    "presets",
]

#: How two devices can be connected. ``host``: tensors stay in host memory (virtual CPU devices
#: of one process share it); ``gloo``: TCP between distributed CPU ranks.
LINK_KINDS = ("pcie", "nvlink", "host", "gloo")
DEVICE_KINDS = ("gpu", "cpu")
#: The arithmetic units a GPU runs a convolution or matrix product on (its rates are per unit).
UNITS = ("cuda_cores", "tensor_cores")
#: Convolution filters by taps: 1x1, up to 3x3 (1x7 and 7x1 included), larger.
FILTERS = ("1x1", "3x3", "larger")
#: A convolution's passes: its forward, and its backward's two (the input's gradient, the filter's).
PASSES = ("forward", "backward_data", "backward_filter")
PRESETS_FILE = Path(__file__).with_name("hardware.yaml")

_FIELDS = {
    "description",
    "kind",
    "cores",
    "fp32_flops",
    "tf32_flops",
    "tf32_convs",
    "memory_bandwidth",
    "memory",
    "launch",
    "links",
    "default_link",
    "sources",
}
#: Fields a preset may leave out: without them its operators run at their roofline.
_OPTIONAL = {"rates", "memory_share", "kernel_floor", "half_flops", "bf16"}


@dataclass(frozen=True)
class Link:
    """A connection between two devices: ``latency + bytes / bandwidth`` seconds per transfer."""

    kind: str
    bandwidth: float  # bytes/s per direction; infinite: no copy is made (shared memory)
    latency: float  # seconds per transfer, whatever its size

    def seconds(self, nbytes: float) -> float:
        """Time to move ``nbytes`` over this link."""
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Rate:
    """What one kind of call achieves: ``overhead + FLOPs / (share x peak)`` seconds.

    Fitted on a public microbenchmark's own calls (never on a row this project
    predicts): ``overhead`` is what a call costs whatever its size (launch,
    set-up, a partly filled last wave), ``share`` the fraction of the unit's
    peak the call's arithmetic reaches. An fp32 3x3 convolution can exceed 1:
    cuDNN's Winograd kernels do fewer multiplications than the direct FLOPs
    the counter charges.
    """

    overhead: float
    share: float

    def seconds(self, flops: float, peak: float) -> float:
        return self.overhead + flops / (self.share * peak)


@dataclass(frozen=True)
class Rates:
    """A unit's measured rates: dense convolutions per filter and pass, and matrix products."""

    name: str
    source: str
    conv: Mapping[str, Mapping[str, Rate]] = field(hash=False)  # FILTERS -> PASSES -> Rate
    matmul: Rate


def filter_of(taps: int) -> str:
    """The :data:`FILTERS` group of a convolution with ``taps`` filter taps."""
    return "1x1" if taps <= 1 else "3x3" if taps <= 9 else "larger"


@dataclass(frozen=True)
class Hardware:
    """One device kind: its peak rates, memory, host overhead per operator and links."""

    name: str
    description: str
    kind: str  # "gpu" | "cpu"
    cores: Optional[int]  # CPU cores of the host (the compute of a cpu preset); None: unknown
    fp32_flops: float  # FLOP/s
    tf32_flops: Optional[float]  # FLOP/s on tensor cores in TF32, dense; None: no TF32
    tf32_convs: bool  # PyTorch's fp32 defaults run convolutions in TF32 on this device
    memory_bandwidth: float  # bytes/s
    memory: int  # bytes per device
    launch: float  # host seconds a kernel launch adds to an operator (GPU); 0 on a CPU
    # Read-only, and left out of the hash so presets stay usable as cache keys.
    links: Mapping[str, Link] = field(hash=False)
    default_link: str  # the kind that connects two devices of this preset unless told otherwise
    sources: Tuple[str, ...]
    rates: Mapping[str, Rates] = field(default_factory=dict, hash=False)  # UNITS -> measured rates
    memory_share: float = 1.0  # the share of memory_bandwidth a streaming kernel reaches
    kernel_floor: float = 0.0  # the shortest a kernel takes, back to back (seconds)
    half_flops: Optional[float] = None  # FLOP/s on tensor cores in fp16 (and bf16 where ``bf16``), dense
    bf16: bool = False  # whether the tensor cores take bfloat16

    def link(self, kind: Optional[str] = None) -> Link:
        """The link of ``kind`` (the default link if None); HarnessError if this preset has none of that kind."""
        wanted = self.default_link if kind is None else kind
        try:
            return self.links[wanted]
        except KeyError:
            have = ", ".join(self.links)
            raise HarnessError(f"hardware {self.name!r} has no {wanted!r} link; it has: {have}") from None

    def conv_flops(self) -> float:
        """The peak a convolution gets under PyTorch's fp32 defaults: TF32 where they allow it."""
        if self.tf32_convs and self.tf32_flops is not None:
            return self.tf32_flops
        return self.fp32_flops

    @property
    def device_type(self) -> str:
        """'cuda' or 'cpu': the devices this preset describes (a GPU preset's are CUDA devices)."""
        return "cpu" if self.kind == "cpu" else "cuda"

    @property
    def conv_unit(self) -> str:
        """The unit PyTorch's fp32 defaults run a convolution on: tensor cores where TF32 is on."""
        return "tensor_cores" if self.tf32_convs and self.tf32_flops is not None else "cuda_cores"

    def unit(self, kind: str, precision: str = precisions.DEFAULT) -> Tuple[str, float]:
        """(unit, peak FLOP/s) an operator of ``kind`` (``conv``, ``matmul``, ``other``) runs at under ``precision``.

        The one rule of which arithmetic a precision uses (see :mod:`gpipe_bench.precision`):
        ``fp32`` is PyTorch's defaults (convolutions in TF32 where :attr:`tf32_convs`, matrix
        products on CUDA cores); ``tf32`` puts both on tensor cores where the GPU has TF32;
        ``bf16``/``fp16`` (autocast) run both on the tensor cores' half-precision peak where
        it has one. Everything else, and anything without such a unit, stays on CUDA cores
        (a CPU's vector units) at the fp32 peak.
        """
        if kind not in ("conv", "matmul"):
            return "cuda_cores", self.fp32_flops
        if precisions.autocast_dtype(precision) is not None and self.half_flops is not None:
            return "tensor_cores", self.half_flops
        if precision == "tf32" and self.tf32_flops is not None:
            return "tensor_cores", self.tf32_flops
        if kind == "conv":
            return self.conv_unit, self.conv_flops()
        return "cuda_cores", self.fp32_flops

    @property
    def precisions(self) -> Tuple[str, ...]:
        """The precisions this preset predicts: those its device type runs (:func:`gpipe_bench.precision.runnable`)
        with a rate to run them at: fp16 on a GPU needs tensor cores (``half_flops``). ``tf32`` on a GPU
        without TF32 is fp32 (PyTorch's TF32 switches do nothing there), and is predicted as such."""
        runs = precisions.runnable(self.device_type, self.bf16)
        return tuple(p for p in runs if not (p == "fp16" and self.device_type == "cuda" and self.half_flops is None))


def check_precision(hardware: Hardware, precision: str) -> None:
    """One :class:`HarnessError` line unless ``hardware``'s preset predicts ``precision``, naming those it does.

    What the device type cannot run is :func:`gpipe_bench.precision.check`'s refusal (the one
    every command gives); what it runs without a rate in the preset (fp16 on a GPU without
    tensor cores) is refused here.
    """
    precisions.check(precision, hardware.device_type, hardware.bf16, device=hardware.name, allowed=hardware.precisions)
    if precision not in hardware.precisions:
        raise HarnessError(
            f"{hardware.name} has no tensor cores to run --precision {precision} on (the preset gives no "
            f"half_flops; its CUDA cores run fp16 at a small fraction of fp32); use one of: "
            f"{', '.join(hardware.precisions)}",
            param="--precision",
        )


def _number(value: object, where: str, positive: bool = True, infinite: bool = False) -> float:
    # bool is an int to Python; a flag where a rate belongs is a mistake. PyYAML reads 1e9 (no dot,
    # no exponent sign) as a string, hence the hint.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or (math.isinf(value) and not (infinite and value > 0))
    ):
        raise HarnessError(f"{where} must be a number, not {value!r}; write floats like 1.0e+9 in YAML")
    if value < 0 or (positive and value == 0):
        raise HarnessError(f"{where} must be {'positive' if positive else 'non-negative'} (got {value!r})")
    return float(value)


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise HarnessError(f"{where} must be true or false (got {value!r})")
    return value


def _link(kind: object, spec: object, where: str) -> Link:
    if kind not in LINK_KINDS:
        raise HarnessError(f"{where}: link kind {kind!r} is not one of {', '.join(LINK_KINDS)}")
    if not isinstance(spec, Mapping) or set(spec) != {"bandwidth", "latency"}:
        raise HarnessError(f"{where}.{kind} must have exactly 'bandwidth' and 'latency' (got {spec!r})")
    return Link(
        kind=str(kind),
        bandwidth=_number(spec["bandwidth"], f"{where}.{kind}.bandwidth", infinite=True),
        latency=_number(spec["latency"], f"{where}.{kind}.latency", positive=False),
    )


def _rate(value: object, where: str) -> Rate:
    if not isinstance(value, list) or len(value) != 2:
        raise HarnessError(f"{where} must be [overhead seconds, share of peak] (got {value!r})")
    return Rate(_number(value[0], f"{where}[0]", positive=False), _number(value[1], f"{where}[1]"))


def _rates(name: str, spec: object, file: Path) -> Rates:
    where = f"{file.name}: rates.{name}"
    if not isinstance(spec, Mapping) or set(spec) != {"source", "conv", "matmul"}:
        raise HarnessError(f"{where} must have exactly source, conv and matmul")
    conv = spec["conv"]
    if not isinstance(conv, Mapping) or set(conv) != set(FILTERS):
        raise HarnessError(f"{where}.conv must give every filter group: {', '.join(FILTERS)}")
    parsed: Dict[str, Mapping[str, Rate]] = {}
    for group in FILTERS:
        passes = conv[group]
        if not isinstance(passes, Mapping) or set(passes) != set(PASSES):
            raise HarnessError(f"{where}.conv.{group} must give every pass: {', '.join(PASSES)}")
        parsed[group] = MappingProxyType({p: _rate(passes[p], f"{where}.conv.{group}.{p}") for p in PASSES})
    return Rates(name, str(spec["source"]), MappingProxyType(parsed), _rate(spec["matmul"], f"{where}.matmul"))


def _preset(name: str, spec: object, file: Path, rates: Mapping[str, Rates]) -> Hardware:
    where = f"{file.name}: {name}"
    if not isinstance(spec, Mapping):
        raise HarnessError(f"{where} must be a mapping of fields, not {type(spec).__name__}")
    missing, unknown = _FIELDS - set(spec), set(spec) - _FIELDS - _OPTIONAL
    if unknown:
        bad = sorted(str(key) for key in unknown)[0]
        close = difflib.get_close_matches(bad, sorted(_FIELDS | _OPTIONAL), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HarnessError(
            f"{where}: unknown field {bad!r}{hint}; fields are {sorted(_FIELDS)}, optional {sorted(_OPTIONAL)}"
        )
    if missing:
        raise HarnessError(f"{where}: missing fields {sorted(missing)}; add them (fields are {sorted(_FIELDS)})")
    if spec["kind"] not in DEVICE_KINDS:
        raise HarnessError(f"{where}.kind {spec['kind']!r} is not one of {', '.join(DEVICE_KINDS)}")
    _flag(spec["tf32_convs"], f"{where}.tf32_convs")
    tf32 = spec["tf32_flops"]
    if spec["tf32_convs"] and tf32 is None:
        raise HarnessError(f"{where}: tf32_convs is true but tf32_flops is null; give the TF32 peak")
    links = spec["links"]
    if not isinstance(links, Mapping) or not links:
        raise HarnessError(f"{where}.links must map link kinds to {{bandwidth, latency}}")
    parsed = {str(kind): _link(kind, link, f"{where}.links") for kind, link in links.items()}
    if spec["default_link"] not in links:
        raise HarnessError(f"{where}.default_link {spec['default_link']!r} is not one of its links: {', '.join(links)}")
    cores = spec["cores"]
    if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
        raise HarnessError(f"{where}.cores must be a positive whole number or null (got {cores!r})")
    sources = spec["sources"]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise HarnessError(f"{where}.sources must be a non-empty list of spec sheets (titles and URLs)")
    units = spec.get("rates") or {}
    if not isinstance(units, Mapping) or set(units) - set(UNITS):
        raise HarnessError(f"{where}.rates must map units ({', '.join(UNITS)}) to a name under rates")
    for unit, table in units.items():
        if table not in rates:
            raise HarnessError(f"{where}.rates.{unit}: {table!r} is not one of the rates: {', '.join(rates)}")
    if spec.get("bf16") is True and spec.get("half_flops") is None:
        raise HarnessError(f"{where}: bf16 is true but half_flops is null; give the tensor cores' fp16/bf16 peak")
    share = _number(spec.get("memory_share", 1.0), f"{where}.memory_share")
    if share > 1:
        raise HarnessError(f"{where}.memory_share must be a share of the peak, at most 1 (got {share!r})")
    return Hardware(
        name=name,
        description=str(spec["description"]),
        kind=str(spec["kind"]),
        cores=cores,
        fp32_flops=_number(spec["fp32_flops"], f"{where}.fp32_flops"),
        tf32_flops=None if tf32 is None else _number(tf32, f"{where}.tf32_flops"),
        tf32_convs=spec["tf32_convs"],
        memory_bandwidth=_number(spec["memory_bandwidth"], f"{where}.memory_bandwidth"),
        memory=int(_number(spec["memory"], f"{where}.memory")),
        launch=_number(spec["launch"], f"{where}.launch", positive=False),
        links=MappingProxyType(parsed),
        default_link=str(spec["default_link"]),
        sources=tuple(sources),
        rates=MappingProxyType({str(unit): rates[str(table)] for unit, table in units.items()}),
        memory_share=share,
        kernel_floor=_number(spec.get("kernel_floor", 0.0), f"{where}.kernel_floor", positive=False),
        half_flops=None if spec.get("half_flops") is None else _number(spec["half_flops"], f"{where}.half_flops"),
        bf16=_flag(spec.get("bf16", False), f"{where}.bf16"),
    )


def _yaml(file: Path, what: str, fix: str = "") -> Any:
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HarnessError(f"cannot read {what} {file}: {exc.strerror}{fix}") from None
    except yaml.YAMLError as exc:
        raise HarnessError(f"{what} {file} is not valid YAML: {' '.join(str(exc).split())}") from None


def _read(file: Path) -> Tuple[Dict[str, Hardware], Dict[str, Rates]]:
    data = _yaml(file, "hardware presets")
    if not isinstance(data, Mapping) or not isinstance(data.get("presets"), Mapping):
        raise HarnessError(f"hardware presets {file} must have a top-level 'presets' mapping")
    rates = {str(name): _rates(str(name), spec, file) for name, spec in (data.get("rates") or {}).items()}
    return {str(name): _preset(str(name), spec, file, rates) for name, spec in data["presets"].items()}, rates


@functools.lru_cache(maxsize=4)
def _file(file: Path) -> Tuple[Dict[str, Hardware], Dict[str, Rates]]:
    return _read(file)


def _presets(file: Path) -> Dict[str, Hardware]:
    return _file(file)[0]


def load_file(path: Path) -> Hardware:
    """A preset of one's own (``--hardware-file PATH``): a YAML file holding one preset's fields.

    The fields are those of a preset under ``presets:`` in the packaged file, checked by the
    same checker; its ``rates`` name the packaged measured rates. Named after the file
    (``my-gpu.yaml``: ``my-gpu``). Every mistake is one :class:`HarnessError` line naming
    the file and the fix, charged to ``--hardware-file``.
    """
    fix = "a YAML file with one preset's fields, as under `presets:` in gpipe_bench/predict/hardware.yaml"
    try:
        data = _yaml(path, "hardware file", f"; give the path of {fix}")
        if isinstance(data, Mapping) and len(data) == 1:
            (name, fields), *_ = data.items()
            if isinstance(fields, Mapping) and name not in _FIELDS | _OPTIONAL:
                raise HarnessError(f"{path.name}: the fields sit under {name!r}; write them at the top level ({fix})")
        return _preset(path.stem, data, path, _file(PRESETS_FILE)[1])
    except HarnessError as error:  # every message names the file; the option is what the user gave
        raise HarnessError(error.message, param="--hardware-file") from None


def presets(file: Optional[Path] = None) -> Dict[str, Hardware]:
    """Every preset of ``file`` (the package's by default), by name, in the file's order."""
    return dict(_presets(file or PRESETS_FILE))


def names(file: Optional[Path] = None) -> List[str]:
    """The preset names, in file order (the packaged presets unless ``file`` is given)."""
    return list(_presets(file or PRESETS_FILE))


def load(name: Union[str, Hardware], file: Optional[Path] = None) -> Hardware:
    """The preset ``name``; HarnessError naming the known presets otherwise.

    A preset already loaded (a ``--hardware-file``'s, :func:`load_file`) is returned as it
    is, so predict and plan take either a name or a preset of one's own.
    """
    if isinstance(name, Hardware):
        return name
    presets = _presets(file or PRESETS_FILE)
    try:
        return presets[name]
    except KeyError:
        known = ", ".join(presets)
        raise HarnessError(
            f"unknown hardware {name!r}; known: {known} (gpipe-bench predict --hardware list; for the CPU at hand, "
            "--costs measured)",
            param="--hardware",
        ) from None
