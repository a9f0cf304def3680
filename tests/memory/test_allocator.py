"""The CUDA caching allocator model: hand-made traces with known outcomes, settings, eras, and random traces.

Every expected figure below follows from the rules in gpipe_bench.memory.allocator's docstring
(512-byte rounding; small pool <= 1 MiB in 2 MiB segments; large pool in 20 MiB segments below
10 MiB, else the request rounded to 2 MiB; best fit per stream; split when the rest is >= 512 B
(small) or > 1 MiB (large)).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from typing import Dict, Hashable, List, Optional

import pytest

from gpipe_bench.memory.allocator import (
    ERA_1_3,
    Alloc,
    Allocator,
    AllocatorOutOfMemory,
    AllocatorSettings,
    EmptyCache,
    Event,
    Free,
    replay,
    round_size,
    segment_size,
)

KIB = 1024
MIB = 1024 * 1024


def consistent(allocator: Allocator) -> None:
    """Reserved bytes are exactly the blocks in use plus the cached free ones; requested <= allocated <= reserved."""
    cached = sum(block.size for pool in allocator._pools for block in pool.blocks.values())
    assert allocator.reserved == allocator.allocated + cached
    assert 0 <= allocator.requested <= allocator.allocated <= allocator.reserved
    assert allocator.peak_reserved >= allocator.reserved and allocator.peak_allocated >= allocator.allocated


# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, rounded",
    [(1, 512), (512, 512), (513, 1024), (1000, 1024), (MIB, MIB), (MIB + 1, MIB + 512), (10 * MIB - 1, 10 * MIB)],
)
def test_requests_round_to_512_bytes(size: int, rounded: int) -> None:
    assert round_size(size) == rounded


@pytest.mark.parametrize(
    "size, segment",
    [
        (512, 2 * MIB),
        (MIB, 2 * MIB),  # the largest small request
        (MIB + 512, 20 * MIB),
        (10 * MIB - 512, 20 * MIB),
        (10 * MIB, 10 * MIB),  # from 10 MiB on: the request rounded up to 2 MiB
        (19 * MIB + 512, 20 * MIB),
        (21 * MIB, 22 * MIB),
    ],
)
def test_segment_sizes(size: int, segment: int) -> None:
    assert segment_size(size) == segment


# -- one request ------------------------------------------------------------------------------


def test_a_small_tensor_reserves_a_2_mib_segment() -> None:
    a = Allocator()
    a.malloc("x", 1000)
    s = a.stats()
    assert (s.allocated, s.requested, s.reserved, s.segments) == (1024, 1000, 2 * MIB, 1)


def test_a_medium_tensor_reserves_20_mib_and_splits() -> None:
    a = Allocator()
    a.malloc("x", 3 * MIB)
    assert (a.allocated, a.reserved) == (3 * MIB, 20 * MIB)
    consistent(a)


def test_requests_that_fill_their_segment_leave_nothing_reserved_unallocated() -> None:
    # One small request is at most 1 MiB, so two of them fill a 2 MiB small segment.
    small = Allocator()
    small.malloc("a", MIB)
    small.malloc("b", MIB)
    assert small.reserved == small.allocated == 2 * MIB and small.segments == 1
    large = Allocator()
    large.malloc("x", 20 * MIB)
    assert large.reserved == large.allocated == 20 * MIB


def test_an_unsplit_remainder_counts_as_allocated() -> None:
    """max_memory_allocated adds block->size: a 19.5 MiB request keeps its whole 20 MiB block (rest 0.5 MiB <= 1 MiB)."""
    a = Allocator()
    a.malloc("x", 19 * MIB + 512 * KIB)
    assert (a.requested, a.allocated, a.reserved) == (19 * MIB + 512 * KIB, 20 * MIB, 20 * MIB)


def test_small_requests_pack_into_one_segment() -> None:
    a = Allocator()
    for i in range(4):
        a.malloc(i, 512 * KIB)
    assert (a.reserved, a.segments) == (2 * MIB, 1)
    a.malloc(4, 512 * KIB)
    assert (a.reserved, a.segments) == (4 * MIB, 2)
    many = Allocator()
    for i in range(2048):
        many.malloc(i, 1000)  # 1024 bytes each: 2048 fill exactly one segment
    assert (many.reserved, many.allocated, many.segments) == (2 * MIB, 2 * MIB, 1)


def test_small_blocks_do_not_serve_large_requests() -> None:
    a = Allocator()
    a.malloc("s", 1000)
    a.free("s")
    a.malloc("l", MIB + 512)
    assert (a.reserved, a.segments) == (22 * MIB, 2)


# -- reuse, splitting, merging ----------------------------------------------------------------


@pytest.mark.parametrize(
    "request_size, allocated",
    [
        (38 * MIB + 512 * KIB, 38 * MIB + 512 * KIB),  # rest 1.5 MiB > 1 MiB: split
        (39 * MIB, 40 * MIB),  # rest exactly 1 MiB: not split (the rule is "> 1 MiB")
        (39 * MIB + 512 * KIB, 40 * MIB),  # rest 0.5 MiB: not split
    ],
)
def test_a_freed_large_block_serves_a_smaller_request(request_size: int, allocated: int) -> None:
    a = Allocator()
    a.malloc("big", 40 * MIB)
    a.free("big")
    a.malloc("next", request_size)
    assert (a.allocated, a.reserved, a.segments) == (allocated, 40 * MIB, 1)
    consistent(a)


def test_the_split_remainder_serves_the_next_request() -> None:
    a = Allocator()
    a.malloc("big", 40 * MIB)
    a.free("big")
    a.malloc("x", 38 * MIB + 512 * KIB)
    a.malloc("y", MIB + 512 * KIB)  # exactly the 1.5 MiB remainder
    assert (a.allocated, a.reserved, a.segments) == (40 * MIB, 40 * MIB, 1)


def test_best_fit_takes_the_smallest_block_that_fits() -> None:
    a = Allocator()
    a.malloc("a", 30 * MIB)
    a.malloc("b", 12 * MIB)
    a.free("a")
    a.free("b")
    a.malloc("c", 11 * MIB)  # the 12 MiB block (rest 1 MiB, not split), not the 30 MiB one
    assert a.allocated == 12 * MIB
    a.malloc("d", 29 * MIB)  # the 30 MiB block is still whole
    assert (a.reserved, a.segments) == (42 * MIB, 2)


def test_freed_neighbours_merge_and_a_whole_segment_is_released() -> None:
    a = Allocator()
    for key in "abc":
        a.malloc(key, 5 * MIB)  # three blocks of one 20 MiB segment, 5 MiB left over
    a.free("a")
    a.free("c")
    a.empty_cache()
    assert a.reserved == 20 * MIB  # "b" keeps the segment
    a.malloc("d", 10 * MIB)  # "c" merged with the 5 MiB rest: 10 MiB fits behind "b"
    assert a.reserved == 20 * MIB
    a.free("d")
    a.free("b")
    consistent(a)
    a.malloc("whole", 20 * MIB)  # all four pieces merged back into one 20 MiB block
    assert (a.allocated, a.reserved, a.segments) == (20 * MIB, 20 * MIB, 1)
    a.free("whole")
    a.empty_cache()
    assert (a.reserved, a.segments) == (0, 0)


def test_blocks_of_another_stream_are_not_reused() -> None:
    a = Allocator()
    a.malloc("x", 40 * MIB, stream=0)
    a.free("x")
    a.malloc("y", 40 * MIB, stream=1)
    assert (a.reserved, a.segments) == (80 * MIB, 2)
    a.malloc("z", 40 * MIB, stream=0)
    assert a.reserved == 80 * MIB


def test_empty_cache_releases_only_unused_segments() -> None:
    a = Allocator()
    a.malloc("kept", 30 * MIB)
    a.malloc("gone", 30 * MIB)
    a.malloc("small", 1000)
    a.malloc("small-gone", 1000, stream=1)
    a.free("gone")
    a.free("small-gone")
    a.empty_cache()
    assert (a.reserved, a.segments, a.peak_reserved) == (32 * MIB, 2, 64 * MIB)
    consistent(a)


# -- PYTORCH_CUDA_ALLOC_CONF ------------------------------------------------------------------


def test_max_split_size_keeps_oversize_blocks_whole() -> None:
    settings = AllocatorSettings.parse("max_split_size_mb:100")
    a = Allocator(settings)
    a.malloc("x", 200 * MIB)
    a.free("x")
    a.malloc("small", 50 * MIB)  # below max_split_size: an oversize cached block does not serve it
    assert a.reserved == 250 * MIB
    a.malloc("near", 190 * MIB)  # >= max_split_size and within 20 MiB of the block: reused, not split
    assert (a.reserved, a.allocated) == (250 * MIB, 250 * MIB)
    a.free("near")
    a.malloc("far", 170 * MIB)  # the 200 MiB block exceeds it by 30 MiB (>= 20 MiB): a new segment
    assert a.reserved == 420 * MIB
    plain = Allocator()
    plain.malloc("x", 200 * MIB)
    plain.free("x")
    plain.malloc("small", 50 * MIB)  # without the setting the 200 MiB block is split
    assert plain.reserved == 200 * MIB


def test_max_non_split_rounding_widens_the_oversize_reuse() -> None:
    a = Allocator(AllocatorSettings.parse("max_split_size_mb:100,max_non_split_rounding_mb:64"))
    a.malloc("x", 200 * MIB)
    a.free("x")
    a.malloc("far", 170 * MIB)
    assert (a.reserved, a.allocated) == (200 * MIB, 200 * MIB)


def test_roundup_power2_divisions() -> None:
    four = AllocatorSettings.parse("roundup_power2_divisions:4")
    assert round_size(1200 * KIB, four) == 1280 * KIB  # the docs' example: 1200 between 1024 and 2048 in 4 steps
    assert round_size(MIB + 1, four) == MIB + 256 * KIB
    assert round_size(4 * MIB, four) == 4 * MIB  # a power of 2 stays
    assert round_size(600, four) == 1024  # at most 512 * divisions: plain 512-byte rounding
    assert round_size(3 * KIB, four) == 3 * KIB  # 2048..4096 in steps of 512
    a = Allocator(four)
    a.malloc("x", 1200 * KIB)
    assert (a.requested, a.allocated) == (1200 * KIB, 1280 * KIB)


def test_roundup_power2_divisions_per_interval() -> None:
    settings = AllocatorSettings.parse("roundup_power2_divisions:[1:2, 64:8, >:4]")
    assert settings.roundup_power2_divisions == (2,) + (0,) * 5 + (4,) * 10
    assert round_size(1200 * KIB, settings) == 1536 * KIB  # 1-2 MiB: 2 steps
    assert round_size(5 * MIB + 1, settings) == 5 * MIB + 512  # 4-8 MiB: 0, plain rounding
    assert round_size(65 * MIB, settings) == 80 * MIB  # 64-128 MiB: 4 steps of 16 MiB


def test_expandable_segments_grow_in_pages() -> None:
    settings = AllocatorSettings.parse("expandable_segments:True")
    a = Allocator(settings)
    a.malloc("a", 30 * MIB)
    assert (a.reserved, a.segments) == (40 * MIB, 1)  # two 20 MiB pages of one large-pool segment
    a.malloc("b", 5 * MIB)  # fits the 10 MiB left in the mapped pages
    assert a.reserved == 40 * MIB
    a.malloc("c", 10 * MIB)  # 5 MiB left: the segment grows by one page
    assert (a.reserved, a.segments) == (60 * MIB, 1)
    consistent(a)
    for i in range(3):
        a.malloc(("s", i), MIB)  # the small pool: its own segment, 2 MiB pages
    assert a.reserved == 60 * MIB + 4 * MIB
    plain = Allocator()
    for key, size in (("a", 30 * MIB), ("b", 5 * MIB), ("c", 10 * MIB)):
        plain.malloc(key, size)
    assert plain.reserved == 50 * MIB  # 30 MiB, then 20 MiB shared by b and c


def test_expandable_empty_cache_unmaps_free_whole_pages() -> None:
    a = Allocator(AllocatorSettings(expandable_segments=True))
    a.malloc("a", 30 * MIB)
    a.malloc("b", 5 * MIB)  # at 30-35 MiB of pages 0-20 and 20-40
    a.free("a")
    a.empty_cache()
    assert (a.reserved, a.segments) == (20 * MIB, 1)  # page 0 was free; page 1 holds "b"
    a.free("b")
    a.empty_cache()
    assert (a.reserved, a.segments) == (0, 0)


def test_expandable_best_fit_leaves_the_growable_end_for_last() -> None:
    """A cached block's size counts the unmapped room after it, so a 4 MiB request takes an 8 MiB hole over the 5 MiB end."""
    a = Allocator(AllocatorSettings(expandable_segments=True))
    a.malloc("p", 5 * MIB)
    a.malloc("hole", 8 * MIB)
    a.malloc("r", 2 * MIB)  # 5 MiB left at the end of the first 20 MiB page
    a.free("hole")
    a.malloc("x", 4 * MIB)  # into the hole: 4 MiB of it stay free
    a.malloc("y", 8 * MIB)  # no free block of 8 MiB: the end grows by a page
    assert a.reserved == 40 * MIB
    consistent(a)


def test_settings_parse_errors_are_one_line_and_name_the_fix() -> None:
    cases = {
        "colour:blue": "allowed: backend, expandable_segments",
        "max_split_size_mb:10": "must be >= 20",
        "max_split_size_mb:big": "expected an integer",
        "expandable_segments:yes": "expected True or False",
        "roundup_power2_divisions:3": "power of 2",
        "roundup_power2_divisions:[3:2]": "interval (MiB) must be a power of 2",
        "garbage_collection_threshold:1.5": "(0.0, 1.0)",
        "max_split_size_mb": "value is missing",
        "max_split_size_mb:100;expandable_segments:True": "expected an integer",
        "backend:cudaMallocAsync": "backend:native",
    }
    for conf, fragment in cases.items():
        with pytest.raises(ValueError) as error:
            AllocatorSettings.parse(conf)
        assert fragment in str(error.value) and "\n" not in str(error.value), conf


def test_settings_parse_reads_every_modelled_key() -> None:
    s = AllocatorSettings.parse(
        "max_split_size_mb:128, expandable_segments:True,garbage_collection_threshold:0.6,"
        "release_lock_on_cudamalloc:True,backend:native"
    )
    assert (s.max_split_size, s.expandable_segments, s.garbage_collection_threshold) == (128 * MIB, True, 0.6)
    assert AllocatorSettings.parse("") == AllocatorSettings()


# -- capacity: releasing the cache, garbage collection, out of memory -------------------------


def test_a_full_device_releases_the_cache_and_retries() -> None:
    a = Allocator(capacity=50 * MIB)
    a.malloc("x", 40 * MIB)
    a.free("x")
    a.malloc("y", 30 * MIB, stream=1)  # 40 + 30 > 50: the cached 40 MiB segment goes first
    assert (a.reserved, a.peak_reserved, a.alloc_retries) == (30 * MIB, 40 * MIB, 1)
    with pytest.raises(AllocatorOutOfMemory):
        a.malloc("z", 30 * MIB, stream=1)
    assert (a.ooms, a.reserved) == (1, 30 * MIB)
    consistent(a)


def test_oversize_blocks_go_before_the_whole_cache() -> None:
    a = Allocator(AllocatorSettings(max_split_size=100 * MIB), capacity=300 * MIB)
    a.malloc("x", 200 * MIB)
    a.free("x")
    a.malloc("y", 30 * MIB)
    a.free("y")  # a cached 30 MiB segment that the full release would also free
    a.malloc("z", 120 * MIB)  # 200 MiB is too big to reuse (>= 120 + 20), 230 + 120 > 300
    assert (a.reserved, a.alloc_retries) == (150 * MIB, 0)  # only the oversize 200 MiB went


def test_replay_reports_where_it_ran_out_of_memory() -> None:
    events: List[Event] = [Alloc("a", 30 * MIB), Alloc("b", 30 * MIB), Free("a"), Alloc("c", 60 * MIB)]
    result = replay(events, capacity=64 * MIB)
    assert result.oom and result.oom_at == 3
    assert (result.peak_reserved, result.stats.ooms) == (60 * MIB, 1)
    assert not replay(events).oom


def test_garbage_collection_frees_old_cached_segments_past_the_threshold() -> None:
    events: List[Event] = [Alloc("a", 30 * MIB), Alloc("b", 30 * MIB), Free("a"), Free("b"), Alloc("x", 30 * MIB, 1)]
    settings = AllocatorSettings.parse("garbage_collection_threshold:0.5")
    assert replay(events, settings, capacity=100 * MIB).peak_reserved == 60 * MIB  # 60 > 50: both cached go
    assert replay(events, capacity=100 * MIB).peak_reserved == 90 * MIB
    assert replay(events, settings).peak_reserved == 90 * MIB  # no capacity: no fraction, no collection


# -- eras -------------------------------------------------------------------------------------


def test_era_1_3_refuses_todays_settings() -> None:
    with pytest.raises(ValueError, match="era 1.3 has no max_split_size_mb"):
        AllocatorSettings.parse("max_split_size_mb:128", era=ERA_1_3)
    with pytest.raises(ValueError, match="expandable_segments"):
        AllocatorSettings(era=ERA_1_3, expandable_segments=True)
    with pytest.raises(ValueError, match="allowed eras"):
        AllocatorSettings(era="0.4")


def test_era_1_3_gives_todays_default_peaks() -> None:
    events = random_trace(random.Random(13), 3000)
    old = replay(events, AllocatorSettings(era=ERA_1_3), capacity=2048 * MIB)
    new = replay(events, capacity=2048 * MIB)
    assert old == new


# -- random traces ----------------------------------------------------------------------------


def random_trace(rng: random.Random, length: int) -> List[Event]:
    """Allocations of small, medium and large sizes on two streams, frees of live ones, a rare empty_cache."""
    events: List[Event] = []
    live: List[int] = []
    for key in range(length):
        roll = rng.random()
        if live and roll < 0.45:
            events.append(Free(live.pop(rng.randrange(len(live)))))
        elif roll < 0.46:
            events.append(EmptyCache())
        else:
            kind = rng.random()
            size = (
                rng.randint(1, MIB)
                if kind < 0.5
                else rng.randint(MIB, 12 * MIB)
                if kind < 0.85
                else rng.randint(10 * MIB, 300 * MIB)
            )
            events.append(Alloc(key, size, rng.randrange(2)))
            live.append(key)
    return events


@pytest.mark.parametrize(
    "conf, capacity",
    [
        ("", None),
        ("", 1024 * MIB),
        ("max_split_size_mb:64", 1024 * MIB),
        ("roundup_power2_divisions:4", None),
        ("expandable_segments:True", None),
        ("expandable_segments:True", 1024 * MIB),
        ("garbage_collection_threshold:0.6,max_split_size_mb:40", 1024 * MIB),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_traces_keep_the_books(conf: str, capacity: Optional[int], seed: int) -> None:
    """Reserved never drops below allocated; freeing everything and emptying the cache returns every byte."""
    rng = random.Random(seed)
    allocator = Allocator(AllocatorSettings.parse(conf), capacity)
    live: Dict[Hashable, int] = {}
    for event in random_trace(rng, 1500):
        if isinstance(event, Free) and event.key not in live:
            continue  # its allocation ran out of memory
        try:
            allocator.apply(event)
        except AllocatorOutOfMemory:
            assert isinstance(event, Alloc) and capacity is not None
            continue
        if isinstance(event, Alloc):
            live[event.key] = event.size
        elif isinstance(event, Free):
            del live[event.key]
        consistent(allocator)
        assert allocator.requested == sum(live.values())
        assert capacity is None or allocator.reserved <= capacity
    for key in list(live):
        allocator.free(key)
    allocator.empty_cache()
    assert (allocator.allocated, allocator.reserved, allocator.segments) == (0, 0, 0)


def test_keys_are_checked() -> None:
    a = Allocator()
    a.malloc("x", 0)  # no block for 0 bytes, as torch hands out none
    assert a.reserved == 0
    a.free("x")
    a.malloc("y", 10)
    with pytest.raises(ValueError, match="already live"):
        a.malloc("y", 10)
    with pytest.raises(ValueError, match="no such live allocation"):
        a.free("nope")


# -- against the real allocator (a GPU machine) -----------------------------------------------

_ON_THE_GPU = """
import json, sys, torch
stream = torch.cuda.Stream()
tensors, steps = {}, []
with torch.cuda.stream(stream):
    for op, key, size in json.load(sys.stdin):
        if op == "alloc":
            tensors[key] = torch.empty(size, dtype=torch.uint8, device="cuda")
        else:
            del tensors[key]
        steps.append([torch.cuda.memory_reserved(), torch.cuda.memory_allocated()])
print(json.dumps(steps))
"""


@pytest.mark.cuda
def test_matches_the_cuda_caching_allocator_step_by_step() -> None:
    """In a fresh process, memory_reserved and memory_allocated move exactly as the model's reserved and allocated."""
    events = [e for e in random_trace(random.Random(7), 600) if not isinstance(e, EmptyCache)]
    trace = [["alloc", e.key, e.size] if isinstance(e, Alloc) else ["free", e.key, 0] for e in events]
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    run = subprocess.run(
        [sys.executable, "-c", _ON_THE_GPU],
        input=json.dumps(trace),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    model = Allocator()
    for event, (reserved, allocated) in zip(events, json.loads(run.stdout)):
        model.apply(Alloc(event.key, event.size) if isinstance(event, Alloc) else event)
        assert (reserved, allocated) == (model.reserved, model.allocated), event
