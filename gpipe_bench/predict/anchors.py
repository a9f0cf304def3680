"""Public figures the predictor is checked against: each predicted from the presets alone, set beside its source.

Why: ``predict`` and ``plan`` answer for hardware the user does not have, so
the only evidence that an answer holds is how well the same model predicts
figures others published for such hardware, with their settings stated.
:data:`ANCHORS_FILE` holds them as data (source, model, batch, precision,
GPU, software, figure, tolerance); :func:`check` predicts each and says
whether it is within its tolerance. Nothing here feeds back into the
predictor: a figure that is missed is reported as missed (``open`` says why),
never fitted.

Two kinds:

- a plain model (:class:`Anchor`): its one training step on one GPU of the
  preset, at the anchor's batch, against the published samples/s;
- a published speed table (:class:`TableAnchors`): every published row, its
  throughput from the preset alone and its speedup with the table's one
  calibration, as ``gpipe-bench predict`` gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from gpipe_bench import config, jobs
from gpipe_bench.config import FLAGS, Overrides
from gpipe_bench.errors import HarnessError

from . import hardware as presets
from .costs import HardwareCosts
from .rows import model_key, step

__all__ = ["ANCHORS_FILE", "PRECISIONS", "Anchor", "TableAnchors", "Checked", "load", "check"]

ANCHORS_FILE = Path(__file__).with_name("anchors.yaml")
#: Precisions an anchor may state, as the row precision each is predicted in: ``fp32`` is PyTorch's
#: defaults; ``amp`` is torch.cuda.amp's autocast in fp16 with a loss scale (what NVIDIA's and Lambda's
#: "AMP" / "mixed precision" ResNet-50 figures ran); ``bf16`` autocast in bf16.
_ROW_PRECISION = {"fp32": "fp32", "amp": "fp16", "bf16": "bf16"}
PRECISIONS = tuple(_ROW_PRECISION)
_FIELDS = (
    "name",
    "model",
    "batch",
    "precision",
    "layout",
    "hardware",
    "gpu",
    "software",
    "data",
    "figure",
    "tolerance",
    "source",
)


@dataclass(frozen=True)
class Anchor:
    """One published single-GPU training throughput of a plain model, with its settings."""

    name: str
    model: str
    batch: int
    precision: str
    layout: str
    hardware: str
    gpu: str
    software: str
    data: str
    figure: float
    tolerance: float
    source: str
    open: Optional[str] = None
    input_size: int = 224
    classes: int = 1000


@dataclass(frozen=True)
class TableAnchors:
    """Every published row of a speed table, predicted on ``hardware``."""

    table: str
    hardware: str
    throughput_tolerance: float
    speedup_tolerance: float
    open: Mapping[str, str]  # "row throughput" / "row speedup" -> why it is missed today


@dataclass(frozen=True)
class Checked:
    """One anchor's figure beside its prediction."""

    name: str
    gpu: str
    model: str
    batch: int
    precision: str
    what: str  # "throughput" or "speedup"
    published: float
    predicted: Optional[float]  # None: not predicted (a precision not modelled yet)
    tolerance: float
    source: str
    open: Optional[str] = None

    @property
    def ratio(self) -> Optional[float]:
        return self.predicted / self.published if self.predicted is not None else None

    @property
    def within(self) -> Optional[bool]:
        """Whether predicted / published lies within 1 ± tolerance (None when not predicted)."""
        return None if self.ratio is None else abs(self.ratio - 1.0) <= self.tolerance + 1e-12

    @property
    def status(self) -> str:
        if self.within is None:
            return "not predicted"
        if self.within:
            return "ok"
        return "missed (open)" if self.open else "missed"


def _fail(where: str, problem: str) -> HarnessError:
    return HarnessError(f"{ANCHORS_FILE.name}: {where}: {problem}")


def _anchor(raw: Mapping[str, Any], index: int) -> Anchor:
    where = f"anchors[{index}]" + (f" ({raw.get('name')})" if isinstance(raw, Mapping) and "name" in raw else "")
    if not isinstance(raw, Mapping):
        raise _fail(where, "is not a mapping")
    missing = [key for key in _FIELDS if key not in raw]
    unknown = sorted(set(raw) - set(_FIELDS) - {"open", "input_size", "classes"})
    if missing or unknown:
        raise _fail(where, f"missing {missing}, unknown {unknown}; each anchor states {', '.join(_FIELDS)}")
    anchor = Anchor(
        **{key: raw[key] for key in _FIELDS},
        open=raw.get("open"),
        input_size=int(raw.get("input_size", 224)),
        classes=int(raw.get("classes", 1000)),
    )
    if anchor.precision not in PRECISIONS:
        raise _fail(where, f"precision {anchor.precision!r} is not one of {', '.join(PRECISIONS)}")
    if anchor.layout not in ("nchw", "nhwc"):
        raise _fail(where, f"layout {anchor.layout!r} is not nchw or nhwc")
    if not (float(anchor.figure) > 0 and 0 < float(anchor.tolerance) < 1 and int(anchor.batch) >= 1):
        raise _fail(where, "figure and batch must be positive and tolerance within (0, 1)")
    if anchor.hardware not in presets.names():
        raise _fail(where, f"hardware {anchor.hardware!r} is not a preset; use one of {', '.join(presets.names())}")
    return anchor


def load(file: Optional[Path] = None) -> "tuple[List[Anchor], List[TableAnchors]]":
    """The anchors of ``file`` (default :data:`ANCHORS_FILE`), validated whole."""
    raw = yaml.safe_load((file or ANCHORS_FILE).read_text())
    anchors = [_anchor(a, k) for k, a in enumerate(raw.get("anchors") or [])]
    names = [a.name for a in anchors]
    if len(names) != len(set(names)):
        raise _fail("anchors", "names repeat")
    tables = [
        TableAnchors(
            str(t["table"]),
            str(t["hardware"]),
            float(t["throughput_tolerance"]),
            float(t["speedup_tolerance"]),
            dict(t.get("open") or {}),
        )
        for t in raw.get("tables") or []
    ]
    return anchors, tables


def _plain_throughput(anchor: Anchor) -> float:
    """The anchor's plain model, one step on one GPU of its preset, predicted from the preset alone.

    In the anchor's precision and layout: an NHWC (channels_last) model's tensor-core
    convolutions pay no transposes.
    """
    table = config.plain_table(anchor.model, classes=anchor.classes)
    profile = table.profile("published")
    # the anchor's values, not a command line's: a mistake is named by its config key
    overrides = Overrides(
        batch=anchor.batch, precision=_ROW_PRECISION[anchor.precision], flags=dict.fromkeys(FLAGS, "")
    )
    row, settings = config.apply(table, profile.rows[0], profile.settings, overrides)
    if settings.input_size != anchor.input_size:
        raise _fail(anchor.name, f"input size {anchor.input_size} is not the plain table's {settings.input_size}")
    job = jobs.Job(table, row, settings, "published", ["cuda:0"])
    preset = presets.load(anchor.hardware)
    outcome = step(job, HardwareCosts(model_key(job), preset, channels_last=anchor.layout == "nhwc"))
    return anchor.batch / outcome.seconds


def _table_rows(spec: TableAnchors) -> List[Checked]:
    from .run import predict_table, predicted_speedups  # the predictor as `gpipe-bench predict` runs it

    table = config.load(spec.table)
    rows = [r for r in table.profile("published").rows if not r.planned and r.published.values]
    absolute = predict_table(table, "published", rows, Overrides(), None, hardware=spec.hardware, memory=False)
    speedups = predicted_speedups(table).speedups
    source = f"{table.source.get('reference', table.name)} ({table.path.split('/')[-1]})"
    out = []
    for p in absolute.rows:
        row = p.job.row
        published = row.published.values
        for what, figure, predicted, tolerance in (
            ("throughput", published.get("throughput"), p.throughput, spec.throughput_tolerance),
            ("speedup", published.get("speedup"), speedups.get(row.name), spec.speedup_tolerance),
        ):
            if figure is None or (what == "speedup" and row.name == table.baseline):
                continue
            out.append(
                Checked(
                    f"{table.name} {row.name}",
                    f"{table.source.get('hardware', spec.hardware)} ({spec.hardware} preset)",
                    table.model,
                    row.batch,
                    "fp32",
                    what,
                    float(figure),
                    predicted,
                    tolerance,
                    source,
                    spec.open.get(f"{row.name} {what}"),
                )
            )
    return out


def check(file: Optional[Path] = None, names: Sequence[str] = ()) -> List[Checked]:
    """Every anchor (or those named) predicted and set beside its figure."""
    anchors, tables = load(file)
    out: List[Checked] = []
    for a in anchors:
        if names and a.name not in names:
            continue
        predicted = _plain_throughput(a)
        out.append(
            Checked(
                a.name,
                a.gpu,
                a.model,
                a.batch,
                a.precision + ("" if a.layout == "nchw" else f" {a.layout}"),
                "throughput",
                float(a.figure),
                predicted,
                float(a.tolerance),
                a.source,
                a.open,
            )
        )
    for t in tables:
        if names and t.table not in names:
            continue
        out.extend(_table_rows(t))
    return out


def as_records(checked: Sequence[Checked]) -> List[Dict[str, Any]]:
    """One object per anchor for ``--format json``."""
    return [
        {
            "name": c.name,
            "gpu": c.gpu,
            "model": c.model,
            "batch": c.batch,
            "precision": c.precision,
            "what": c.what,
            "published": c.published,
            "predicted": c.predicted,
            "ratio": c.ratio,
            "tolerance": c.tolerance,
            "status": c.status,
            "open": c.open,
            "source": c.source,
        }
        for c in checked
    ]
