"""The event simulator: exclusive resources in order, shared ones by processor sharing, dependencies."""

import pytest

from gpipe_bench.predict.events import Simulator


def test_exclusive_resource_runs_one_task_at_a_time_in_order() -> None:
    sim = Simulator()
    a = sim.add("gpu", 2.0)
    b = sim.add("gpu", 1.0)
    assert sim.run() == 3.0
    assert (sim.tasks[a].start, sim.tasks[a].end) == (0.0, 2.0)
    assert (sim.tasks[b].start, sim.tasks[b].end) == (2.0, 3.0)


def test_dependencies_and_free_tasks() -> None:
    sim = Simulator()
    a = sim.add("x", 1.0)
    b = sim.add("y", 1.0)
    c = sim.add(None, 0.5, [a, b])
    assert sim.run() == 1.5
    assert sim.tasks[c].start == 1.0


def test_shared_cores_slow_down_in_proportion() -> None:
    sim = Simulator()
    sim.shared("cores", 2)
    # four one-thread tasks on two cores: each at half speed
    tasks = [sim.add("cores", 1.0) for _ in range(4)]
    assert sim.run() == pytest.approx(2.0)
    # two two-thread tasks and capacity 2: each at half speed too
    sim = Simulator()
    sim.shared("cores", 2)
    sim.add("cores", 1.0, weight=2)
    sim.add("cores", 1.0, weight=2)
    assert sim.run() == pytest.approx(2.0)
    assert all(sim.tasks[t].end > 0 for t in tasks[:2])


def test_a_task_finishing_early_speeds_up_the_others() -> None:
    sim = Simulator()
    sim.shared("cores", 1)
    short = sim.add("cores", 1.0)
    long = sim.add("cores", 3.0)
    assert sim.run() == pytest.approx(4.0)
    assert sim.tasks[short].end == pytest.approx(2.0)
    assert sim.tasks[long].end == pytest.approx(4.0)


def test_bad_input() -> None:
    sim = Simulator()
    with pytest.raises(ValueError):
        sim.add("x", -1.0)
    with pytest.raises(ValueError):
        sim.add("x", 1.0, [5])
    with pytest.raises(ValueError):
        sim.shared("cores", 0)


def test_contention_slows_tasks_only_while_they_share() -> None:
    sim = Simulator()
    sim.shared("cores", 2, contention=0.5)
    a = sim.add("cores", 1.0)
    b = sim.add("cores", 3.0)
    # together until a ends: each at 1 / 1.5; a ends at 1.5, b has 2 left alone at full rate
    assert sim.run() == pytest.approx(3.5)
    assert sim.tasks[a].end == pytest.approx(1.5)
    assert sim.tasks[b].end == pytest.approx(3.5)
    alone = Simulator()
    alone.shared("cores", 2, contention=0.5)
    alone.add("cores", 1.0, weight=2)
    assert alone.run() == pytest.approx(1.0)
