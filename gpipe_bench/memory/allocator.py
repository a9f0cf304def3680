"""A model of PyTorch's CUDA caching allocator: replay an allocation trace, get peak reserved and allocated bytes.

Why: the published memory tables report what the CUDA caching allocator
*reserved* (``torch.cuda.max_memory_reserved``, called ``max_memory_cached``
in 2019) minus model memory, while :mod:`gpipe_bench.memory.predict` sums the
bytes tensors hold (predicted/published 0.47-0.57 on that table). The gap is the
allocator's rounding, segment sizes and fragmentation. This module replays a
trace of allocations and frees, in execution order, through the allocator's
rules and reports what it would have reserved. It needs no GPU and no torch.

How to use it: one :class:`Allocator` per device (the C++ keeps one
``DeviceCachingAllocator`` per device), fed :class:`Alloc`, :class:`Free` and
:class:`EmptyCache` events in execution order, or :func:`replay` over such a
sequence. Keys are the caller's (a storage id, a name); streams are any
hashable (blocks belong to the stream that allocated them).

Sources (read, not copied; every constant below names its C++ constant):

* today: ``c10/cuda/CUDACachingAllocator.cpp`` at pytorch/pytorch commit
  001074d25084 (main), and the ``PYTORCH_CUDA_ALLOC_CONF`` parser
  ``c10/core/AllocatorConfig.cpp`` at commit 065861fba759; the settings as the
  docs describe them: https://pytorch.org/docs/stable/notes/cuda.html
  ("Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF").
* 2019 (``era="1.3"``): ``c10/cuda/CUDACachingAllocator.cpp`` as of v1.3.x
  (the 775-line file before PR #27361's statistics rework, whose 2019-10-04
  diff shows the same constants as context).

The rules (each lives in one function here):

* every request is rounded up to a multiple of 512 bytes, at least 512
  (:func:`round_size`; with ``roundup_power2_divisions`` to a power-of-2
  division instead);
* requests of at most 1 MiB (after rounding) use the small pool, whose
  segments are 2 MiB; larger ones the large pool, whose segment is 20 MiB for
  requests below 10 MiB, else the request rounded up to 2 MiB
  (:func:`segment_size`);
* a request takes the smallest cached free block of its pool and stream that
  fits (ties: lowest address), else a new segment; a block is split when the
  remainder is >= 512 bytes (small pool) or > 1 MiB (large pool)
  (:meth:`Allocator._should_split`); a freed block merges with free
  neighbours of its segment;
* when a new segment does not fit under ``capacity``: free cached oversize
  blocks (only with ``max_split_size_mb``), then every cached unsplit segment
  of every pool and stream, and retry; then :class:`AllocatorOutOfMemory`;
* ``empty_cache`` frees every cached segment with no block in use.

What ``allocated`` counts (checked in the source): ``memory_allocated`` /
``max_memory_allocated`` add ``block->size`` when a block is handed out
(``stats.allocated_bytes`` today; ``increaseAllocated(block->size)`` in 1.3),
i.e. the rounded size, and the whole block when the remainder was too small
to split (a 19.5 MiB request on a fresh 20 MiB segment counts 20 MiB). The
sum of the sizes asked for is ``requested`` (torch >= 2.0's
``requested_bytes``); that is what a tensor-bytes meter sums.

1.3 against today, found in the two sources: the constants (512 B, 1 MiB,
2 MiB, 10 MiB, 20 MiB, 2 MiB rounding), the pool choice, best fit per stream,
the splitting rule, the merging and the release-all-and-retry on a failed
``cudaMalloc`` are the same; with today's defaults both give the same peaks.
What 1.3 lacks: every ``PYTORCH_CUDA_ALLOC_CONF`` setting (``max_split_size``,
the oversize-block reuse limit and the release of oversize blocks before the
full release, ``roundup_power2_divisions``, ``expandable_segments``,
``garbage_collection_threshold``, which needs ``set_per_process_memory_fraction``,
also absent), and the ``requested_bytes`` statistic. ``era="1.3"`` therefore
refuses those settings rather than changing any rule. (Older allocators, the
2017-2018 ``THCCachingAllocator``, rounded large requests to 128 KiB; not
modelled.)

Left out: ``recordStream`` and its events (a freed block is reusable at once,
as on a single stream), CUDA graph pools, IPC, the free-memory callbacks, the
``cudaMallocAsync`` backend, memory outside the allocator (CUDA context,
cuBLAS/cuDNN handles, NCCL), and real addresses: segments get increasing
addresses, which only break ties between free blocks of equal size. An
expandable segment is one address range per pool and stream, 9/8 of
``capacity`` (the C++ reserves 9/8 of the GPU's memory) or 256 TiB without one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterable, List, NamedTuple, Optional, Tuple, Union

__all__ = [
    "ERAS",
    "ERA_1_3",
    "ERA_CURRENT",
    "VERSION",
    "Alloc",
    "Allocator",
    "AllocatorOutOfMemory",
    "AllocatorSettings",
    "AllocatorStats",
    "EmptyCache",
    "Event",
    "Free",
    "ReplayResult",
    "replay",
    "round_size",
    "segment_size",
]

VERSION = (
    "PyTorch c10/cuda/CUDACachingAllocator.cpp at commit 001074d25084 (main) with c10/core/AllocatorConfig.cpp "
    "at 065861fba759; era '1.3': the same file as of v1.3.x"
)
ERA_CURRENT = "current"
ERA_1_3 = "1.3"
ERAS = (ERA_CURRENT, ERA_1_3)

_MIB = 1024 * 1024  # kMB (c10/core/AllocatorConfig.cpp@065861f)

# c10/cuda/CUDACachingAllocator.cpp, identical at 001074d2 and v1.3.x:
MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
SMALL_SIZE = 1 * _MIB  # kSmallSize: largest "small" allocation is 1 MiB
SMALL_BUFFER = 2 * _MIB  # kSmallBuffer: "small" allocations are packed in 2 MiB blocks
LARGE_BUFFER = 20 * _MIB  # kLargeBuffer: "large" allocations may be packed in 20 MiB blocks
MIN_LARGE_ALLOC = 10 * _MIB  # kMinLargeAlloc: allocations between 1 and 10 MiB may use kLargeBuffer
ROUND_LARGE = 2 * _MIB  # kRoundLarge: round up large allocations to 2 MiB

# c10/core/AllocatorConfig.cpp@065861f: roundup_power2_divisions has one entry per power-of-2
# interval, kRoundUpPowerOfTwoIntervals = 16 of them from kRoundUpPowerOfTwoStart = 1 MiB
# (2**20) up; sizes below 1 MiB use the first entry, sizes above 32 GiB the last.
ROUNDUP_INTERVALS = 16
_ROUNDUP_FIRST_LOG2 = 20
# parseMaxSplitSize / parseMaxNonSplitRoundingSize (same file): min_allowed_split_size_mb = kLargeBuffer / kMB.
MIN_SPLIT_SIZE_MB = LARGE_BUFFER // _MIB
# Note [Expandable Segments] (CUDACachingAllocator.cpp@001074d2): "there is 256TiB of address space";
# an expandable segment reserves totalGlobalMem + totalGlobalMem / 8 of it (find_expandable_block).
_ADDRESS_SPACE = 1 << 48

# Free blocks sort by (size, address) as BlockComparatorSize does within a stream; one int per block
# (size * _SPAN + address) keeps bisect on plain ints.
_SPAN = 1 << 80

# Keys PYTORCH_CUDA_ALLOC_CONF accepts (AllocatorConfig::parseArgs, CUDAAllocatorConfig::parseArgs)
# that change nothing in the device pools: accepted and ignored.
_IGNORED_KEYS = (
    "graph_capture_record_stream_reuse",
    "pinned_num_register_threads",
    "pinned_reserve_segment_size_mb",
    "pinned_use_background_threads",
    "pinned_use_cuda_host_register",
    "release_lock_on_cudamalloc",
)
_MODELLED_KEYS = (
    "backend",
    "expandable_segments",
    "garbage_collection_threshold",
    "max_non_split_rounding_mb",
    "max_split_size_mb",
    "roundup_power2_divisions",
)
_NO_DIVISIONS: Tuple[int, ...] = (0,) * ROUNDUP_INTERVALS


def _is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _conf_error(item: str, why: str) -> ValueError:
    return ValueError(f"PYTORCH_CUDA_ALLOC_CONF {item}: {why}")


class _Tokens:
    """PYTORCH_CUDA_ALLOC_CONF split as AllocatorConfig::lexArgs splits it: ``, : [ ]`` are tokens, spaces dropped."""

    def __init__(self, conf: str) -> None:
        self.items: List[str] = []
        word = ""
        for char in conf:
            if char in ",:[]":
                if word:
                    self.items.append(word)
                    word = ""
                self.items.append(char)
            elif char != " ":
                word += char
        if word:
            self.items.append(word)
        self.at = 0

    def done(self) -> bool:
        return self.at >= len(self.items)

    def take(self, key: str) -> str:
        if self.done():
            raise _conf_error(key, "the value is missing")
        self.at += 1
        return self.items[self.at - 1]

    def peek(self) -> str:
        return "" if self.done() else self.items[self.at]

    def expect(self, token: str, key: str) -> None:
        got = self.take(key)
        if got != token:
            raise _conf_error(key, f"expected '{token}', got '{got}'")


def _integer(key: str, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _conf_error(f"{key}:{text}", f"expected {what}") from None


def _parse_divisions(tokens: _Tokens, key: str) -> Tuple[int, ...]:
    """``roundup_power2_divisions``: one power of 2 for all sizes, or ``[256:1,512:2,>:8]`` per size in MiB.

    As parseRoundUpPower2Divisions (AllocatorConfig.cpp@065861f) reads it: the first ``MB:N``
    also sets every smaller interval; intervals between two given ones keep 0 (no rounding);
    ``>:N`` sets the last given interval and every larger one. (The CUDA notes' example reads
    each bound as the top of its interval; this follows the parser's code.)
    """
    first = tokens.take(key)
    if first != "[":
        value = _integer(key, first, "a power of 2 or a list [MB:N,...,>:N]")
        if not _is_power_of_2(value):
            raise _conf_error(f"{key}:{first}", "the divisions must be a power of 2")
        return (value,) * ROUNDUP_INTERVALS
    divisions = [0] * ROUNDUP_INTERVALS
    given = False
    last = 0
    while True:
        bound = tokens.take(key)
        if bound == "]":
            return tuple(divisions)
        tokens.expect(":", key)
        text = tokens.take(key)
        value = _integer(key, text, "a number of divisions")
        if value != 0 and not _is_power_of_2(value):
            raise _conf_error(f"{key} {bound}:{text}", "the divisions must be 0 or a power of 2")
        if bound == ">":
            divisions[last:] = [value] * (ROUNDUP_INTERVALS - last)
        else:
            size_mb = _integer(key, bound, "an interval in MiB (a power of 2) or '>'")
            if not _is_power_of_2(size_mb):
                raise _conf_error(f"{key} {bound}:{text}", "the interval (MiB) must be a power of 2")
            index = min(size_mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
            if not given:
                divisions[:index] = [value] * index
                given = True
            divisions[index] = value
            last = index
        if tokens.peek() != "]":
            tokens.expect(",", key)


def _parse_bool(key: str, text: str) -> bool:
    if text not in ("True", "False"):
        raise _conf_error(f"{key}:{text}", "expected True or False")
    return text == "True"


@dataclass(frozen=True)
class AllocatorSettings:
    """The allocator's settings: the ``PYTORCH_CUDA_ALLOC_CONF`` keys that change device memory, and the era.

    ``era``: ``"current"`` (today's allocator) or ``"1.3"`` (the 2019 allocator the published
    tables were measured with; it has none of the settings, so it refuses them).
    ``max_split_size``: bytes (``max_split_size_mb``); ``None`` splits every block.
    ``max_non_split_rounding``: bytes an oversize cached block may exceed the request by and
    still serve it (``max_non_split_rounding_mb``, default kLargeBuffer = 20 MiB).
    ``roundup_power2_divisions``: one entry per power-of-2 interval from 1 MiB (16 of them).
    ``garbage_collection_threshold``: a fraction of ``capacity``; 0 is off (it acts only with a
    capacity, as the C++ acts only after ``set_per_process_memory_fraction``).
    """

    era: str = ERA_CURRENT
    max_split_size: Optional[int] = None
    max_non_split_rounding: int = LARGE_BUFFER
    roundup_power2_divisions: Tuple[int, ...] = _NO_DIVISIONS
    expandable_segments: bool = False
    garbage_collection_threshold: float = 0.0
    conf: str = field(default="", compare=False)  # the PYTORCH_CUDA_ALLOC_CONF parsed, as written (records name it)

    def __post_init__(self) -> None:
        if self.era not in ERAS:
            raise ValueError(f"allocator era '{self.era}': allowed eras are {', '.join(ERAS)}")
        least = MIN_SPLIT_SIZE_MB * _MIB
        if self.max_split_size is not None and self.max_split_size < least:
            raise ValueError(f"max_split_size {self.max_split_size}: must be at least {least} bytes (20 MiB)")
        if self.max_non_split_rounding < least:
            raise ValueError(f"max_non_split_rounding {self.max_non_split_rounding}: must be at least {least} bytes")
        divisions = self.roundup_power2_divisions
        if len(divisions) != ROUNDUP_INTERVALS or any(d != 0 and not _is_power_of_2(d) for d in divisions):
            raise ValueError(
                f"roundup_power2_divisions {divisions}: expected {ROUNDUP_INTERVALS} entries, each 0 or a power of 2"
            )
        if not 0.0 <= self.garbage_collection_threshold < 1.0:
            raise ValueError(f"garbage_collection_threshold {self.garbage_collection_threshold}: must be in [0, 1)")
        if self.era == ERA_1_3:
            self._check_1_3()

    def _check_1_3(self) -> None:
        """PyTorch 1.3's allocator reads no settings: none of today's may differ from its default."""
        changed = [
            name
            for name, value, default in (
                ("max_split_size_mb", self.max_split_size, None),
                ("max_non_split_rounding_mb", self.max_non_split_rounding, LARGE_BUFFER),
                ("roundup_power2_divisions", self.roundup_power2_divisions, _NO_DIVISIONS),
                ("expandable_segments", self.expandable_segments, False),
                ("garbage_collection_threshold", self.garbage_collection_threshold, 0.0),
            )
            if value != default
        ]
        if changed:
            raise ValueError(
                f"allocator era 1.3 has no {', '.join(changed)}: its allocator reads no PYTORCH_CUDA_ALLOC_CONF"
            )

    @classmethod
    def parse(cls, conf: str, era: str = ERA_CURRENT) -> AllocatorSettings:
        """Settings from a ``PYTORCH_CUDA_ALLOC_CONF`` string, e.g. ``"max_split_size_mb:128,expandable_segments:True"``.

        Raises ValueError (one line) naming the bad key or value and what is allowed.
        """
        tokens = _Tokens(conf)
        max_split: Optional[int] = None
        rounding = LARGE_BUFFER
        divisions = _NO_DIVISIONS
        expandable = False
        threshold = 0.0
        while not tokens.done():
            key = tokens.take("")
            if key not in _MODELLED_KEYS and key not in _IGNORED_KEYS:
                allowed = ", ".join(_MODELLED_KEYS)
                raise _conf_error(
                    f"key '{key}'", f"unknown; allowed: {allowed} (and, ignored here: {', '.join(_IGNORED_KEYS)})"
                )
            tokens.expect(":", key)
            if key == "max_split_size_mb":
                max_split = _split_size_mb(key, tokens.take(key))
            elif key == "max_non_split_rounding_mb":
                rounding = _split_size_mb(key, tokens.take(key))
            elif key == "roundup_power2_divisions":
                divisions = _parse_divisions(tokens, key)
            elif key == "expandable_segments":
                expandable = _parse_bool(key, tokens.take(key))
            elif key == "garbage_collection_threshold":
                threshold = _fraction(key, tokens.take(key))
            elif key == "backend":
                _native_backend(tokens.take(key))
            else:
                tokens.take(key)
            if not tokens.done():
                tokens.expect(",", key)
        return cls(era, max_split, rounding, divisions, expandable, threshold, conf.strip())

    def divisions(self, size: int) -> int:
        """The ``roundup_power2_divisions`` entry for ``size`` (AllocatorConfig::roundup_power2_divisions)."""
        index = size.bit_length() - 1 - _ROUNDUP_FIRST_LOG2
        return self.roundup_power2_divisions[min(max(index, 0), ROUNDUP_INTERVALS - 1)]


def _split_size_mb(key: str, text: str) -> int:
    value = _integer(key, text, f"an integer number of MiB >= {MIN_SPLIT_SIZE_MB}")
    if value < MIN_SPLIT_SIZE_MB:
        raise _conf_error(f"{key}:{text}", f"too small, must be >= {MIN_SPLIT_SIZE_MB} (MiB)")
    return value * _MIB


def _fraction(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _conf_error(f"{key}:{text}", "expected a number in (0.0, 1.0)") from None
    if not 0.0 < value < 1.0:
        raise _conf_error(f"{key}:{text}", "must be in (0.0, 1.0)")
    return value


def _native_backend(text: str) -> None:
    if text != "native":
        raise _conf_error(f"backend:{text}", "only the native caching allocator is modelled (backend:native)")


_DEFAULT = AllocatorSettings()


def _roundup_power2_division(size: int, divisions: int) -> int:
    """``size`` up to the next of ``divisions`` equal steps between its two powers of 2 (1200, 4 -> 1280)."""
    if _is_power_of_2(size):
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    return -(-size // step) * step


def round_size(size: int, settings: AllocatorSettings = _DEFAULT) -> int:
    """The block size a request of ``size`` bytes asks for (DeviceCachingAllocator::round_size)."""
    if size < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    divisions = settings.divisions(size)
    if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
        return _roundup_power2_division(size, divisions)
    return -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE


def segment_size(size: int) -> int:
    """The segment ``cudaMalloc`` gets for a rounded request no cached block serves (get_allocation_size)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class Alloc(NamedTuple):
    """``size`` bytes for ``key`` on ``stream`` (the tensor's storage, or any id the caller frees later)."""

    key: Hashable
    size: int
    stream: Hashable = 0


class Free(NamedTuple):
    """The allocation of ``key`` is released."""

    key: Hashable


class EmptyCache(NamedTuple):
    """``torch.cuda.empty_cache()``: cached segments with nothing in use go back to the driver."""


Event = Union[Alloc, Free, EmptyCache]


class AllocatorOutOfMemory(Exception):
    """The model ran out of ``capacity``: no segment fits even after releasing the cache (CUDA's OOM)."""


@dataclass(frozen=True)
class AllocatorStats:
    """Bytes now and at their peak, as ``torch.cuda.memory_stats`` names them.

    ``allocated``: block bytes in use (``allocated_bytes``; ``memory_allocated``): rounded sizes,
    whole unsplit blocks. ``reserved``: segment bytes (``reserved_bytes``; ``memory_reserved``,
    1.3's ``memory_cached``); expandable segments count their mapped pages. ``requested``: the
    sizes asked for (``requested_bytes``). ``segments``: ``cudaMalloc``'d segments, plus live
    expandable segments. ``alloc_retries``: allocations retried after releasing the whole cache
    (``num_alloc_retries``); ``ooms``: allocations that failed (``num_ooms``).
    """

    allocated: int
    peak_allocated: int
    reserved: int
    peak_reserved: int
    requested: int
    peak_requested: int
    segments: int
    peak_segments: int
    alloc_retries: int
    ooms: int


class _Segment:
    """An expandable segment: a range of address space whose pages are mapped as needed."""

    __slots__ = ("base", "page")

    def __init__(self, base: int, page: int) -> None:
        self.base = base
        self.page = page


class _Block:
    """A range of a segment: in use, cached free, or (expandable segments) not mapped."""

    __slots__ = (
        "addr",
        "size",
        "stream",
        "small",
        "allocated",
        "mapped",
        "prev",
        "next",
        "segment",
        "requested",
        "gc_base",
    )

    def __init__(
        self,
        addr: int,
        size: int,
        stream: Hashable,
        small: bool,
        segment: Optional[_Segment] = None,
        mapped: bool = True,
    ) -> None:
        self.addr = addr
        self.size = size
        self.stream = stream
        self.small = small
        self.allocated = False
        self.mapped = mapped
        self.prev: Optional[_Block] = None
        self.next: Optional[_Block] = None
        self.segment = segment
        self.requested = 0
        self.gc_base = 0

    def splice(self, before: Optional[_Block], after: Optional[_Block]) -> None:
        """Put this block between two neighbours of a segment."""
        self.prev = before
        self.next = after
        if before is not None:
            before.next = self
        if after is not None:
            after.prev = self


def _expandable_size(block: _Block) -> int:
    """A cached block's size counting the unmapped space right after it (get_free_block's best fit)."""
    after = block.next
    return block.size + (after.size if after is not None and not after.mapped else 0)


def _usable(block: Optional[_Block]) -> bool:
    return block is not None and not block.allocated


class _Pool:
    """The cached free blocks of one pool (small or large), per stream, best fit first."""

    __slots__ = ("small", "free", "blocks", "unmapped", "calls")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.free: Dict[Hashable, List[int]] = {}
        self.blocks: Dict[int, _Block] = {}
        self.unmapped: Dict[Hashable, Dict[int, _Block]] = {}
        self.calls = 0  # get_free_block calls: the garbage collector's clock (get_free_blocks_call_count)

    def insert(self, block: _Block) -> None:
        key = block.size * _SPAN + block.addr
        bisect.insort(self.free.setdefault(block.stream, []), key)
        self.blocks[key] = block
        block.gc_base = self.calls

    def remove(self, block: _Block) -> None:
        key = block.size * _SPAN + block.addr
        keys = self.free[block.stream]
        del keys[bisect.bisect_left(keys, key)]
        del self.blocks[key]

    def cached(self) -> List[_Block]:
        return list(self.blocks.values())


class Allocator:
    """One device's caching allocator: :meth:`malloc`, :meth:`free`, :meth:`empty_cache`, :meth:`stats`.

    ``capacity``: the bytes the allocator may reserve (the GPU's free memory, or what
    ``set_per_process_memory_fraction`` allows); ``None`` is unlimited and never runs out.
    """

    def __init__(self, settings: Optional[AllocatorSettings] = None, capacity: Optional[int] = None) -> None:
        self.settings = settings if settings is not None else _DEFAULT
        self.capacity = capacity
        self._pools = (_Pool(small=False), _Pool(small=True))
        self._live: Dict[Hashable, Optional[_Block]] = {}
        self._next_addr = 0
        self._gc = capacity is not None and self.settings.garbage_collection_threshold > 0.0
        self.allocated = self.peak_allocated = 0
        self.reserved = self.peak_reserved = 0
        self.requested = self.peak_requested = 0
        self.segments = self.peak_segments = 0
        self.alloc_retries = self.ooms = 0

    # -- the public calls ---------------------------------------------------------------------

    def malloc(self, key: Hashable, size: int, stream: Hashable = 0) -> None:
        """Allocate ``size`` bytes for ``key`` on ``stream``; AllocatorOutOfMemory when it cannot fit."""
        if key in self._live:
            raise ValueError(f"allocation key {key!r} is already live")
        if size < 0:
            raise ValueError(f"allocation of {key!r}: size {size} is negative")
        if size == 0:  # NativeCachingAllocator::allocate hands out no block for 0 bytes
            self._live[key] = None
            return
        rounded = round_size(size, self.settings)
        pool = self._pools[rounded <= SMALL_SIZE]
        block = self._get_free_block(pool, rounded, stream)
        if block is None:
            block = self._new_block(pool, rounded, stream, size)
        block = self._take(pool, block, rounded, stream)
        block.allocated = True
        block.requested = size
        self._live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.requested += size
        self.peak_requested = max(self.peak_requested, self.requested)

    def free(self, key: Hashable) -> None:
        """Release ``key``'s allocation: its block goes back to the cache, merged with free neighbours."""
        try:
            block = self._live.pop(key)
        except KeyError:
            raise ValueError(f"free of {key!r}: no such live allocation") from None
        if block is None:
            return
        self.allocated -= block.size
        self.requested -= block.requested
        block.allocated = False
        self._free_block(block)

    def rename(self, key: Hashable, new: Hashable) -> None:
        """Hand ``key``'s allocation to ``new``: nothing moves (a trace's shortcut for a tensor that takes a freed one's block)."""
        if new in self._live:
            raise ValueError(f"allocation key {new!r} is already live")
        try:
            self._live[new] = self._live.pop(key)
        except KeyError:
            raise ValueError(f"rename of {key!r}: no such live allocation") from None

    def empty_cache(self) -> None:
        """Return every cached segment with nothing in use (release_cached_blocks)."""
        for pool in self._pools:
            expandable = []
            for block in pool.cached():
                if block.segment is not None:
                    if block.size >= block.segment.page:  # smaller ones hold no whole page to unmap
                        expandable.append(block)
                elif block.prev is None and block.next is None:
                    self._release_block(pool, block)
            for block in expandable:
                self._unmap_block(pool, block)

    def reset_peaks(self) -> None:
        """Peaks restart from the current figures (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
        self.peak_requested = self.requested
        self.peak_segments = self.segments

    def stats(self) -> AllocatorStats:
        return AllocatorStats(
            self.allocated,
            self.peak_allocated,
            self.reserved,
            self.peak_reserved,
            self.requested,
            self.peak_requested,
            self.segments,
            self.peak_segments,
            self.alloc_retries,
            self.ooms,
        )

    def apply(self, event: Event) -> None:
        """Run one trace event."""
        if isinstance(event, Alloc):
            self.malloc(event.key, event.size, event.stream)
        elif isinstance(event, Free):
            self.free(event.key)
        elif isinstance(event, EmptyCache):
            self.empty_cache()
        else:
            raise TypeError(f"not an allocator event: {event!r} (expected Alloc, Free or EmptyCache)")

    # -- finding a block ----------------------------------------------------------------------

    def _get_free_block(self, pool: _Pool, size: int, stream: Hashable) -> Optional[_Block]:
        """The smallest cached block of the pool and stream that fits, if the oversize rules allow it."""
        if self._gc:
            pool.calls += 1
        keys = pool.free.get(stream)
        if not keys:
            return None
        at = bisect.bisect_left(keys, size * _SPAN)
        if at == len(keys):
            return None
        if self.settings.expandable_segments:
            at = self._past_growable(pool, keys, at)
        block = pool.blocks[keys[at]]
        limit = self.settings.max_split_size
        if limit is not None:
            if size < limit <= block.size:  # an oversize block serves no request below max_split_size
                return None
            if size >= limit and block.size >= size + self.settings.max_non_split_rounding:
                return None
        pool.remove(block)
        return block

    @staticmethod
    def _past_growable(pool: _Pool, keys: List[int], at: int) -> int:
        """Best fit among expandable blocks counts the unmapped room after a block, so the growable end is left for last."""
        while at + 1 < len(keys):
            here, after = pool.blocks[keys[at]], pool.blocks[keys[at + 1]]
            if here.segment is None or _expandable_size(after) >= _expandable_size(here):
                break
            at += 1
        return at

    def _should_split(self, block: _Block, size: int) -> bool:
        """Whether the rest of ``block`` after ``size`` bytes becomes a free block of its own."""
        remaining = block.size - size
        if block.small or self.settings.expandable_segments:
            return remaining >= MIN_BLOCK_SIZE
        limit = self.settings.max_split_size
        return (limit is None or size < limit) and remaining > SMALL_SIZE

    def _take(self, pool: _Pool, block: _Block, size: int, stream: Hashable) -> _Block:
        """The block that serves the request: ``block``, or its first ``size`` bytes when it splits."""
        if not self._should_split(block, size):
            return block
        head = _Block(block.addr, size, stream, pool.small, block.segment)
        head.splice(block.prev, block)
        block.addr += size
        block.size -= size
        pool.insert(block)
        return head

    # -- new memory ---------------------------------------------------------------------------

    def _new_block(self, pool: _Pool, size: int, stream: Hashable, asked: int) -> _Block:
        """A fresh segment (or mapped pages), releasing cached memory first when it does not fit."""
        if self._gc:
            self._collect_garbage()
        block = self._alloc_block(pool, size, stream)
        if block is None and self._release_oversize(pool, size, stream):
            block = self._alloc_block(pool, size, stream)
        if block is None:
            self.empty_cache()
            self.alloc_retries += 1
            block = self._alloc_block(pool, size, stream)
        if block is None:
            self.ooms += 1
            raise AllocatorOutOfMemory(
                f"tried to allocate {asked} bytes (a {size}-byte block, a {segment_size(size)}-byte segment) "
                f"with {self.capacity} bytes of capacity: {self.reserved} reserved, {self.allocated} allocated"
            )
        return block

    def _fits(self, more: int) -> bool:
        return self.capacity is None or self.reserved + more <= self.capacity

    def _alloc_block(self, pool: _Pool, size: int, stream: Hashable) -> Optional[_Block]:
        """A new segment from the driver, or ``None`` when it would pass ``capacity``."""
        segment = segment_size(size)
        if not self._fits(segment):  # alloc_block checks the limit with this size for either kind of segment
            return None
        if self.settings.expandable_segments:
            return self._grow(pool, size, stream)
        block = _Block(self._claim(segment), segment, stream, pool.small)
        self._count_segments(1)
        self._reserve(segment)
        return block

    def _claim(self, size: int) -> int:
        """An address range of ``size`` bytes no other segment uses."""
        addr = self._next_addr
        self._next_addr += size
        return addr

    def _reserve(self, size: int) -> None:
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _count_segments(self, change: int) -> None:
        self.segments += change
        self.peak_segments = max(self.peak_segments, self.segments)

    # -- returning memory ---------------------------------------------------------------------

    def _free_block(self, block: _Block) -> None:
        pool = self._pools[block.small]
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.insert(block)

    def _merge(self, pool: _Pool, into: _Block, other: Optional[_Block]) -> None:
        """Merge a free neighbour of the same kind (mapped or not) into ``into``, which is in no cache yet."""
        if other is None or other.allocated or other.mapped != into.mapped:
            return
        if other.mapped:
            pool.remove(other)
        else:
            del pool.unmapped[other.stream][other.addr]
        if into.prev is other:
            into.addr = other.addr
            into.splice(other.prev, into.next)
        else:
            into.splice(into.prev, other.next)
        into.size += other.size

    def _release_block(self, pool: _Pool, block: _Block) -> None:
        """``cudaFree`` of a cached whole segment."""
        pool.remove(block)
        self._count_segments(-1)
        self.reserved -= block.size

    def _release_oversize(self, pool: _Pool, size: int, stream: Hashable) -> bool:
        """Free cached oversize segments, just enough for the request (release_available_cached_blocks)."""
        limit = self.settings.max_split_size
        if limit is None:
            return False
        keys = pool.free.get(stream, [])
        target = max(size, limit)
        at = bisect.bisect_left(keys, target * _SPAN)
        if at < len(keys) and pool.blocks[keys[at]].segment is None:
            self._release_block(pool, pool.blocks[keys[at]])
            return True
        released = 0
        while released < target and at > 0:  # no single one is enough: the largest first
            block = pool.blocks[keys[at - 1]]
            if block.size < limit or block.segment is not None or block.prev is not None or block.next is not None:
                break
            released += block.size
            self._release_block(pool, block)
            at -= 1
        return released >= target

    def _collect_garbage(self) -> None:
        """Free cached large segments not reused for long, once reserved passes the threshold (garbage_collect_cached_blocks)."""
        assert self.capacity is not None
        threshold = int(self.settings.garbage_collection_threshold * self.capacity)
        if self.reserved <= threshold:
            return
        pool = self._pools[False]
        target = self.reserved - threshold
        candidates = [b for b in pool.cached() if b.segment is None and b.prev is None and b.next is None]
        total_age = sum(pool.calls - b.gc_base for b in candidates)
        reclaimed = 0
        while reclaimed < target and candidates:
            average = total_age / len(candidates)
            old = [b for b in candidates if pool.calls - b.gc_base >= average]
            if not old:
                return
            for block in old:
                reclaimed += block.size
                total_age -= pool.calls - block.gc_base
                self._release_block(pool, block)
            gone = {id(b) for b in old}
            candidates = [b for b in candidates if id(b) not in gone]

    # -- expandable segments ------------------------------------------------------------------

    def _grow(self, pool: _Pool, size: int, stream: Hashable) -> Optional[_Block]:
        """Map pages of an expandable segment until a free range of ``size`` bytes exists (try_allocate_expandable_block)."""
        block = self._find_room(pool, size, stream)
        if not block.mapped and not self._map(pool, block, min(block.size, size)):
            return None
        while block.size < size:
            after = block.next
            assert after is not None and not after.mapped
            if not self._map(pool, after, min(size - block.size, after.size)):
                return None
            block = after
        pool.remove(block)
        return block

    def _find_room(self, pool: _Pool, size: int, stream: Hashable) -> _Block:
        """The lowest unmapped range (with the free block before it) that can hold ``size``, or a new segment."""
        unmapped = pool.unmapped.setdefault(stream, {})
        for addr in sorted(unmapped):
            start = unmapped[addr]
            if _usable(start.prev):
                assert start.prev is not None
                start = start.prev
            if self._room_from(start, size):
                return start
        # Note [Expandable Segments]: 2 MiB pages (kSmallBuffer) for the small pool, 20 MiB (kLargeBuffer) for the large.
        page = SMALL_BUFFER if pool.small else LARGE_BUFFER
        room = _ADDRESS_SPACE if self.capacity is None else self.capacity + self.capacity // 8
        room = -(-room // page) * page
        segment = _Segment(self._claim(room), page)
        block = _Block(segment.base, room, stream, pool.small, segment, mapped=False)
        unmapped[block.addr] = block
        self._count_segments(1)
        return block

    @staticmethod
    def _room_from(block: Optional[_Block], size: int) -> bool:
        room = 0
        while room < size and block is not None and _usable(block):
            room += block.size
            block = block.next
        return room >= size

    def _map(self, pool: _Pool, block: _Block, size: int) -> bool:
        """Map whole pages from the start of an unmapped range to cover ``size`` bytes (map_block)."""
        segment = block.segment
        assert segment is not None and (block.addr - segment.base) % segment.page == 0
        mapped = -(-size // segment.page) * segment.page
        if not self._fits(mapped):
            return False
        del pool.unmapped[block.stream][block.addr]
        block.mapped = True
        if mapped < block.size:
            rest = _Block(block.addr + mapped, block.size - mapped, block.stream, block.small, segment, mapped=False)
            rest.splice(block, block.next)
            pool.unmapped[block.stream][rest.addr] = rest
            block.size = mapped
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.insert(block)
        self._reserve(mapped)
        return True

    def _unmap_block(self, pool: _Pool, block: _Block) -> None:
        """Unmap the whole pages inside a cached block; a segment left with nothing mapped goes (unmap_block)."""
        segment = block.segment
        assert segment is not None
        page = segment.page
        low = segment.base + -(-(block.addr - segment.base) // page) * page
        high = segment.base + (block.addr + block.size - segment.base) // page * page
        if low >= high:
            return
        pool.remove(block)
        end = block.addr + block.size
        if low > block.addr:
            before = _Block(block.addr, low - block.addr, block.stream, block.small, segment)
            before.splice(block.prev, block)
            pool.insert(before)
        if end > high:
            after = _Block(high, end - high, block.stream, block.small, segment)
            after.splice(block, block.next)
            pool.insert(after)
        block.addr, block.size, block.mapped = low, high - low, False
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        self.reserved -= high - low
        if block.prev is None and block.next is None:  # release_expandable_segment
            self._count_segments(-1)
        else:
            pool.unmapped[block.stream][block.addr] = block


@dataclass(frozen=True)
class ReplayResult:
    """What a trace left: the statistics, and the index of the event that ran out of memory (``None`` if none did)."""

    stats: AllocatorStats
    oom_at: Optional[int] = None

    @property
    def oom(self) -> bool:
        return self.oom_at is not None

    @property
    def peak_reserved(self) -> int:
        return self.stats.peak_reserved

    @property
    def peak_allocated(self) -> int:
        return self.stats.peak_allocated


def replay(
    events: Iterable[Event], settings: Optional[AllocatorSettings] = None, capacity: Optional[int] = None
) -> ReplayResult:
    """Replay one device's events in execution order; an out-of-memory event stops the replay there."""
    allocator = Allocator(settings, capacity)
    malloc, free = allocator.malloc, allocator.free
    done = 0
    try:
        for event in events:
            if isinstance(event, Alloc):
                malloc(event.key, event.size, event.stream)
            elif isinstance(event, Free):
                free(event.key)
            else:
                allocator.apply(event)
            done += 1
    except AllocatorOutOfMemory:
        return ReplayResult(allocator.stats(), done)
    return ReplayResult(allocator.stats())
