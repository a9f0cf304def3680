"""``gpipe-bench plan``'s answer as text or JSON: the best plans, the published configuration beside them.

Why a module of its own: the search (:mod:`gpipe_bench.predict.plan`) returns
figures; how they are written (units, the command under each plan, what the
JSON carries) is the report layer's business, as for every other table.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Dict, List

from .format import format_bytes, render_grid
from .predicted import precision_words

if TYPE_CHECKING:
    from gpipe_bench.predict.plan import Plan, Planned

__all__ = ["as_records", "render"]


def _record(plan: "Plan", p: "Planned", rank: int) -> Dict[str, Any]:
    outcome = p.prediction.outcome
    return {
        "rank": rank,  # 0: the published configuration
        "published": rank == 0,
        "balance": list(p.choice.balance),
        "chunks": p.choice.chunks,
        "checkpoint": p.choice.checkpoint,
        "schedule": p.choice.schedule if plan.engine == "distributed" else None,
        "processes": p.choice.processes or None,
        "throughput": p.throughput,
        "speedup": plan.speedup(p),
        "step_seconds": outcome.seconds,
        "bubble": outcome.bubble,
        "peak_memory_bytes": p.peak,
        "memory_bytes_per_device": p.memory,
        "command": p.command,
    }


def as_records(plan: "Plan") -> List[Dict[str, Any]]:
    """The plans best first, then the published configuration (``published: true``)."""
    out = [_record(plan, p, i + 1) for i, p in enumerate(plan.plans)]
    if plan.published is not None:
        out.append(_record(plan, plan.published, 0))
    return out


def render(plan: "Plan", fmt: str = "rst") -> str:
    """The answer in ``fmt`` ('rst', 'md' or 'json')."""
    records = as_records(plan)
    if fmt == "json":
        return json.dumps(records, indent=2)
    unit = plan.table.unit
    distributed = plan.engine == "distributed"
    headers = ["Plan", "Balance", "Chunks", "Schedule" if distributed else "Checkpoint", "Predicted", "Speedup"]
    headers += ["Peak memory / device", "Bubble"]
    rows = []
    for r in records:
        rows.append(
            [
                f"#{r['rank']}" if r["rank"] else "published",
                ",".join(str(b) for b in r["balance"]),
                str(r["chunks"]),
                (
                    f"{r['schedule']} ({len(r['balance']) // r['processes']}/process)"
                    if distributed
                    else r["checkpoint"]
                ),
                f"{r['throughput']:.3f} {unit}",
                f"{r['speedup']:.3f}x",
                format_bytes(r["peak_memory_bytes"]) if r["peak_memory_bytes"] is not None else "–",
                f"{100 * r['bubble']:.1f}%",
            ]
        )
    cap = f"{format_bytes(plan.cap)} per device ({plan.cap_source})" if plan.cap is not None else "none"
    words = precision_words(plan.precision)
    lines = [
        f"{plan.table.title.split(' speed')[0]} on {','.join(plan.devices)}, batch {plan.batch} "
        f"({plan.profile} profile, {'torch.distributed.pipelining' if distributed else 'gpipe-bench'} engine"
        f"{', ' + plan.precision if words else ''})",
        *([f"precision: {words}"] if words else []),
        f"costs: {plan.costs}",
        f"memory cap: {cap}",
        f"speedup over {plan.baseline[0]}: {plan.baseline[1]:.3f} {unit} predicted the same way",
        f"{plan.considered} configurations balanced, {plan.simulated} simulated, in {plan.seconds:.1f} s",
        "",
        render_grid(headers, rows, ["left", "left", "right", "left", "right", "right", "right", "right"], fmt),
        "",
    ]
    for r in records:
        lines.append(f"{'#' + str(r['rank']) if r['rank'] else 'published'}: {r['command']}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
