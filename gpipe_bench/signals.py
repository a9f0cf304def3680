"""One signal policy for every command that runs rows: SIGINT and SIGTERM stop a run as Ctrl-C does.

Why: a scheduler, ``timeout``, ``docker stop`` or systemd sends SIGTERM to the
main process only, and Python's default for SIGTERM is to die on the spot:
no line, no cleanup, and the processes the run started (data-parallel
replicas, torchrun's ranks) left computing, holding a GPU's memory.

The policy:

- The first SIGINT or SIGTERM raises :class:`Stopped` (a KeyboardInterrupt)
  in the main thread, so the same code that handles Ctrl-C handles both: the
  row in progress is abandoned without a record, finished rows and seeds
  stay, one line says what was interrupted, and the exit code is
  ``128 + signal`` (130 for SIGINT, 143 for SIGTERM: :func:`exit_code`).
- A second signal ends the process at once (``os._exit``), after the
  stoppers registered with :func:`on_stop` have told the children to go.
- A child the run starts never outlives it: :func:`die_with_parent` asks
  Linux to signal the child when its parent dies, even by SIGKILL, which
  no handler sees.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Callable, Iterator, List, Optional

__all__ = [
    "Stopped",
    "die_with_parent",
    "exit_code",
    "install",
    "on_stop",
]

PR_SET_PDEATHSIG = 1

#: Called (in order) before a second signal ends the process: each tells its children to stop.
_STOPPERS: List[Callable[[], None]] = []
_RECEIVED: List[int] = []


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM delivered to this process: the run stops as after Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(interrupt: BaseException) -> int:
    """The exit code of a run ended by ``interrupt``: 128 + the signal's number (Ctrl-C: SIGINT, 130)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def _handle(signum: int, frame: Optional[FrameType]) -> None:
    _RECEIVED.append(signum)
    if len(_RECEIVED) > 1:  # the second signal: no more waiting
        for stop in list(_STOPPERS):
            try:
                stop()
            except Exception:  # noqa: BLE001 - the process ends now whatever a stopper does
                pass
        sys.stderr.write(f"\nStopped by a second {signal.Signals(signum).name}.\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    raise Stopped(signum)


def install() -> Callable[[], None]:
    """Handle SIGINT and SIGTERM by the policy above, in this process; returns what puts the old handlers back.

    From the main thread only (elsewhere nothing changes). A command run in
    process (a test, a notebook) restores the caller's handlers when it ends.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _RECEIVED.clear()
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in saved:
        signal.signal(signum, _handle)

    def restore() -> None:
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    return restore


@contextmanager
def on_stop(stopper: Callable[[], None]) -> Iterator[None]:
    """Within the block, ``stopper`` runs before a second signal ends the process (it must not block)."""
    _STOPPERS.append(stopper)
    try:
        yield
    finally:
        _STOPPERS.remove(stopper)


def die_with_parent(signum: int = signal.SIGTERM, parent: Optional[int] = None) -> bool:
    """Have Linux send ``signum`` to this process when its parent dies; whether that could be arranged.

    ``parent``: the pid the parent had when it started this process; if it is
    already gone (it died before this call), this process is sent ``signum``
    at once, as it would have been. Elsewhere than Linux nothing is arranged
    (False): the parent's own stop still reaches its children.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True
