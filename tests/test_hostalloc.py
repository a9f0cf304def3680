"""gpipe_bench.hostalloc: the host allocator policy every measuring command applies alike, and records."""

from __future__ import annotations

import ctypes
import sys

import pytest

from gpipe_bench import hostalloc


@pytest.fixture(autouse=True)
def _policy_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the process runs under is recorded with every result: leave it as the tests found it."""
    monkeypatch.setattr(hostalloc, "_current", hostalloc._current)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steady_fixes_both_thresholds_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Libc:
        def mallopt(self, option: int, value: int) -> int:
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    described = hostalloc.apply("steady")
    assert calls == [(hostalloc._M_MMAP_THRESHOLD, 32 << 20), (hostalloc._M_TRIM_THRESHOLD, 1 << 30)]
    assert described == hostalloc.current() == "steady: glibc mmap threshold 32 MiB, trim threshold 1 GiB"


def test_without_mallopt_steady_says_the_default_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> object:
        raise OSError("not glibc")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert hostalloc.apply("steady") == hostalloc.current() == "default (mallopt unavailable: not glibc)"


def test_default_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda name: pytest.fail("default must not touch the allocator"))
    assert hostalloc.apply("default") == hostalloc.current() == "default (glibc as configured)"


def test_an_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="use one of steady, default"):
        hostalloc.apply("jemalloc")
