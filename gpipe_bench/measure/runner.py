"""Run resolved jobs one after another, saving each record as soon as it exists.

The same for every measurement and engine: the results directory is checked
before the first row (a long run must not fail at its end), each row's record
is written whole when the row finishes, and Ctrl-C (or SIGTERM, by
:mod:`gpipe_bench.signals`) stops the run between records: the rows already
saved stay, the interrupted one writes nothing.
What the user sees is the caller's: ``before`` and ``after`` are told of
each row. Without a results directory (``root=None``) nothing is written:
predictions sized for devices this host may not have (``memory --predict-only``)
are shown, never saved where measurements of this host live.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from gpipe_bench import results
from gpipe_bench.jobs import Job
from gpipe_bench.results import Result

__all__ = ["RowInterrupted", "run_rows"]


class RowInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signum``) in ``job``; ``saved`` rows were written before it, ``completed_epochs`` of
    it had finished (speed)."""

    def __init__(self, job: Job, saved: int, completed_epochs: Optional[int], signum: int = signal.SIGINT) -> None:
        super().__init__(job.row.name)
        self.job, self.saved, self.completed_epochs, self.signum = job, saved, completed_epochs, signum


def run_rows(
    jobs: Sequence[Job],
    measure: Callable[[Job], Optional[Result]],
    root: Optional[Path],
    *,
    writer: bool = True,
    before: Optional[Callable[[Job], None]] = None,
    after: Optional[Callable[[Job, Result, Optional[Path]], None]] = None,
) -> List[Result]:
    """``measure`` each job and save its record under ``root``; the records made, in order.

    ``writer``: whether this process writes records (rank 0 of a launch); a
    job whose ``measure`` returns None (another rank's part) saves nothing.
    ``root=None``: the records are returned, not written (``after`` is told None).
    """
    if writer and root is not None:
        results.check_writable(root)
    done: List[Result] = []
    for job in jobs:
        if before is not None:
            before(job)
        try:
            result = measure(job)
        except KeyboardInterrupt as interrupt:
            raise RowInterrupted(
                job,
                len(done),
                getattr(interrupt, "completed_epochs", None),
                getattr(interrupt, "signum", signal.SIGINT),
            ) from None
        if result is None:
            continue
        path = results.save(result, root) if root is not None else None
        if after is not None:
            after(job, result, path)
        done.append(result)
    return done
