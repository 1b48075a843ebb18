"""The thread budget: the CPUs a process may use, its share among local ranks, fewer threads under contention and
more when a CPU is free, a fixed count when the user sets one."""

import logging

import pytest
import torch

from yolotrain.utils import threads
from yolotrain.utils.threads import (
    ThreadGovernor,
    available_cpus,
    budget_threads,
    cgroup_cpu_limit,
    decide_threads,
    start_thread_governor,
    starting_threads,
)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("v2, v1, expected", [
    ("max 100000\n", None, None),
    ("150000 100000\n", None, 1.5),
    (None, ("-1", "100000"), None),
    (None, ("200000", "100000"), 2.0),
    (None, None, None),
])
def test_cgroup_quota_in_cpus(tmp_path, monkeypatch, v2, v1, expected):
    monkeypatch.setattr(threads, "CGROUP_V2_CPU_MAX", tmp_path / "cpu.max")
    monkeypatch.setattr(threads, "CGROUP_V1_QUOTA", tmp_path / "cfs_quota_us")
    monkeypatch.setattr(threads, "CGROUP_V1_PERIOD", tmp_path / "cfs_period_us")
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cfs_quota_us").write_text(v1[0])
        (tmp_path / "cfs_period_us").write_text(v1[1])
    assert cgroup_cpu_limit() == expected


def test_available_cpus_is_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert available_cpus() == 4
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert available_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.5)
    assert available_cpus() == 1


def test_the_budget_is_shared_among_local_ranks_unless_given(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    assert budget_threads() == 8
    assert budget_threads(local_processes=3) == 2
    assert budget_threads(local_processes=16) == 1
    assert budget_threads(threads=5, local_processes=3) == 5


@pytest.mark.parametrize("current, budget, got, others, idle, expected", [
    (2, 2, 1.8, 0.0, 0.0, 2),   # alone: stays
    (2, 2, 1.0, 0.1, 0.0, 2),   # alone with busy data workers (not counted as others): stays
    (2, 2, 0.7, 1.3, 0.0, 1),   # three runs on two cores: each had 0.7 CPUs for 2 threads
    (8, 8, 3.0, 5.0, 0.0, 5),   # 8 threads with 3 CPUs' worth: as many as the CPU it got carries
    (1, 2, 0.98, 0.0, 0.9, 2),  # a CPU stands idle again: one more
    (2, 2, 1.9, 0.0, 0.9, 2),   # never above the budget
    (1, 2, 0.98, 1.0, 0.1, 1),  # still shared: stays
    (1, 1, 0.3, 1.7, 0.0, 1),   # never below one
])
def test_decisions(current, budget, got, others, idle, expected):
    assert decide_threads(current, budget, got, others, idle) == expected


def test_runs_started_together_start_with_the_cpus_left():
    assert starting_threads(2, cpus=2, runnable=1) == 2
    assert starting_threads(2, cpus=2, runnable=3) == 1
    assert starting_threads(8, cpus=8, runnable=3) == 6
    assert starting_threads(4, cpus=8, runnable=None) == 4  # the system does not say: the budget


def scripted_clocks(monkeypatch, readings):
    """The governor's clocks (wall, process CPU, children CPU, machine idle, machine busy seconds) from `readings`
    in turn, and its wall clock from their first entries."""
    values = iter([r for r in readings if len(r) > 1])  # a 1-tuple is a wall reading between intervals only
    walls = iter([r[0] for r in readings[1:]])
    monkeypatch.setattr(ThreadGovernor, "_clocks", staticmethod(lambda: next(values)))
    monkeypatch.setattr(threads.time, "perf_counter", lambda: next(walls))


def test_the_governor_drops_a_thread_under_contention_and_takes_it_back(monkeypatch, caplog):
    monkeypatch.setattr(threads, "starting_threads", lambda budget: budget)
    # 0-3 s: 1.4 CPU-s for this process, 0.1 for its workers, 6 busy on the machine (others: 4.5 CPU-s);
    # 3-6 s: 2.9 CPU-s for this process, 2.7 idle.
    scripted_clocks(monkeypatch, [(0.0, 0.0, 0.0, 0.0, 0.0), (1.0,), (3.0, 1.4, 0.1, 0.0, 6.0),
                                  (6.0, 4.3, 0.1, 2.7, 9.0)])
    governor = ThreadGovernor(budget=2, interval=2.0).start()
    assert torch.get_num_threads() == 2
    with caplog.at_level(logging.INFO, logger="yolotrain"):
        assert governor.check() == 2  # 1 s: not an interval yet
        assert governor.check() == 1 and torch.get_num_threads() == 1  # 0.47 CPUs for 2 threads, others 1.5
        assert governor.check() == 2 and torch.get_num_threads() == 2  # 0.9 CPUs idle over the next 3 s
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("threads: 1 (other programs hold the CPUs: this process had 0.47 CPUs for 2 "
                                  "threads, other programs 1.50")
    assert messages[1].startswith("threads: 2 (a CPU is free again")


def test_busy_data_workers_of_the_run_itself_keep_the_threads(monkeypatch):
    monkeypatch.setattr(threads, "starting_threads", lambda budget: budget)
    # 3 s: the process had 1.5 CPU-s (0.5 CPUs), its data workers 4.4 of the 6 busy CPU-s: nobody else.
    scripted_clocks(monkeypatch, [(0.0, 0.0, 0.0, 0.0, 0.0), (3.0, 1.5, 4.4, 0.0, 6.0)])
    governor = ThreadGovernor(budget=2, interval=2.0).start()
    assert governor.check() == 2 and torch.get_num_threads() == 2


def test_a_fixed_count_never_changes(monkeypatch):
    scripted_clocks(monkeypatch, [(0.0, 0.0, 0.0, 0.0, 0.0), (10.0, 1.0, 0.0, 0.0, 20.0)])
    governor = ThreadGovernor(budget=3, fixed=True).start()
    assert governor.check() == 3 and torch.get_num_threads() == 3


def test_the_threads_argument_and_omp_num_threads_fix_the_count(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_runnable_tasks", lambda: 1)
    governor = start_thread_governor()
    assert (governor.budget, governor.fixed, torch.get_num_threads()) == (2, False, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    governor = start_thread_governor()
    assert (governor.budget, governor.fixed, torch.get_num_threads()) == (1, True, 1)
    governor = start_thread_governor(threads=2)
    assert (governor.budget, governor.fixed, torch.get_num_threads()) == (2, True, 2)


def test_training_runs_the_threads_it_is_given_and_says_so(train_overrides, yolotrain_log):
    from yolotrain.tasks.detect.train import DetectionTrainer

    seen = []
    trainer = DetectionTrainer(overrides={**train_overrides, "threads": 2, "epochs": 1, "val": False})
    trainer.add_callback("on_train_batch_end", lambda t: seen.append(torch.get_num_threads()))
    trainer.train()
    assert set(seen) == {2}
    assert any(m.startswith("resolved: threads=2,") for m in yolotrain_log)


@pytest.mark.parametrize("thread_count, expected_workers", [(2, 0), (1, 1)])
def test_training_on_two_cpus_leaves_data_workers_what_the_threads_do_not_use(
    train_overrides, yolotrain_log, monkeypatch, thread_count, expected_workers
):
    """On 2 CPUs, 2 compute threads load the data in-process (train and val); 1 thread leaves a CPU to a worker."""
    from yolotrain.tasks.detect.train import DetectionTrainer

    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    trainer = DetectionTrainer(overrides={**train_overrides, "threads": thread_count, "workers": 8, "epochs": 1,
                                          "val": False})
    trainer.train()
    assert trainer.train_loader.num_workers == expected_workers
    assert trainer.test_loader.num_workers == expected_workers
    assert any(f"workers={expected_workers}" in m for m in yolotrain_log if m.startswith("resolved:"))
