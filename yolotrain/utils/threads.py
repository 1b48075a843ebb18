"""The thread budget: how many compute threads a process runs, decided once at set-up and adapted to the CPU it
actually gets.

At set-up the budget is the CPUs this process may use (its affinity mask, capped by the cgroup CPU quota of a
container; not `os.cpu_count()`, which counts the whole machine) shared among the local processes of a
multi-process run; `threads=N`, else an `OMP_NUM_THREADS` the environment sets, fixes it instead. Data workers
count the same CPUs: on a small machine computing on the CPU they get only what the compute threads leave
(`data_worker_cpus`).

Under load the budget alone is not enough: OpenMP threads wait for each other at the end of every parallel region,
and when a sibling thread is descheduled (three trainings on two cores, a tuning sweep, other work) the waiting
threads spin and whole steps stall: three runs at once took 104 s each with 2 threads against 15 s with 1 (the
reference trainer runs 1 thread always, and so is 1.45x slower alone). `ThreadGovernor` therefore watches the CPU
time the process gets: when its threads get less than `LOW_SHARE` of a CPU each over an interval it runs fewer
threads, and when a CPU stands idle it takes one back, up to the budget. `threads=N` fixes the count.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

LOGGER = logging.getLogger(__name__)

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
CHECK_INTERVAL_S = 2.0  # how often the governor looks at the CPU it got
PROC_STAT = Path("/proc/stat")
LOAD_SAMPLES = 5  # readings of the runnable task count at start, LOAD_SAMPLE_GAP_S apart (their median counts)
LOAD_SAMPLE_GAP_S = 0.02
LOW_SHARE = 0.6  # below this share of a CPU per thread, the threads are contending
OTHERS_BUSY = 0.5  # CPUs other programs must be using for the contention to be theirs (not this run's data workers)
IDLE_CPUS_FOR_ONE_MORE = 0.75  # a thread comes back when this much of a CPU stood idle over an interval
IN_PROCESS_LOADING_MAX_CPUS = 2  # CPUs per rank up to which CPU compute threads come before data workers


def cgroup_cpu_limit() -> float | None:
    """The CPUs a container's quota allows (cgroup v2 `cpu.max`, or v1 quota / period), None without a quota."""
    try:
        if CGROUP_V2_CPU_MAX.is_file():
            quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if CGROUP_V1_QUOTA.is_file() and CGROUP_V1_PERIOD.is_file():
            quota = int(CGROUP_V1_QUOTA.read_text())
            return None if quota <= 0 else quota / int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by the cgroup quota (whole CPUs, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def data_worker_cpus(world_size=1, compute_threads=None) -> int:
    """The CPUs one rank's data workers may take: all of the rank's CPUs, or, where the rank computes on the CPU
    (`compute_threads` given) with no more than IN_PROCESS_LOADING_MAX_CPUS of them, only those its compute
    threads leave free (none: the data loads in the training process).

    A worker process beside compute threads that hold every CPU preempts one of them, and the others wait for it at
    the end of each parallel region: on 2 CPUs (COCO128 at 320 px, fp32) training ran 13.9 img/s loading
    in-process, 12.6 with one worker and 11.0 with two. Bigger machines keep their workers.
    """
    cpus = available_cpus() // max(1, int(world_size))
    if compute_threads is None or cpus > IN_PROCESS_LOADING_MAX_CPUS:
        return cpus
    return max(0, cpus - int(compute_threads))


def cpu_compute_threads(device, governor) -> int | None:
    """The compute threads a data loader shares the CPUs with: the `governor`'s budget where the model runs on the
    CPU, None where it runs elsewhere (or no budget is known)."""
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    return governor.budget if on_cpu and governor is not None else None


def budget_threads(threads=None, local_processes=1) -> int:
    """Compute threads of one process: `threads` when given, else its share of `available_cpus()`."""
    if threads:
        return int(threads)
    return max(1, available_cpus() // max(1, int(local_processes)))


def decide_threads(current, budget, got_cpus, others_cpus, idle_cpus) -> int:
    """The thread count after an interval in which this process had `got_cpus` CPUs on average, other programs
    (not this run's data workers) `others_cpus`, and `idle_cpus` stood idle: fewer when each thread got less than
    LOW_SHARE of a CPU because others hold the CPUs (this run's own data workers do not count: fewer threads beside
    them was measured slower), one more (up to `budget`) when a CPU stood idle, else the same."""
    if current > 1 and got_cpus < LOW_SHARE * current and others_cpus >= OTHERS_BUSY:
        return max(1, min(current - 1, math.floor(got_cpus / LOW_SHARE)))
    if current < budget and idle_cpus >= IDLE_CPUS_FOR_ONE_MORE:
        return current + 1
    return current


def starting_threads(budget, cpus=None, runnable=None) -> int:
    """The threads to start with: the budget, less the CPUs other tasks are running on right now (`runnable`
    includes this process; the median of a few readings of the kernel's count), at least 1. Three runs started
    together begin with one thread each instead of spinning for their first interval."""
    runnable = _runnable_tasks() if runnable is None else runnable
    if runnable is None:
        return budget
    cpus = available_cpus() if cpus is None else cpus
    busy_elsewhere = max(0, runnable - 1)
    return max(1, min(budget, cpus - busy_elsewhere))


def _runnable_tasks() -> int | None:
    """Tasks the kernel is running or ready to run now (`procs_running` of /proc/stat), the median of a few
    readings; None where the system does not say."""
    readings = []
    for i in range(LOAD_SAMPLES):
        try:
            for line in PROC_STAT.read_text().splitlines():
                if line.startswith("procs_running"):
                    readings.append(int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < LOAD_SAMPLES:
            time.sleep(LOAD_SAMPLE_GAP_S)
    return sorted(readings)[len(readings) // 2] if readings else None


def _machine_cpu_seconds() -> tuple[float, float] | None:
    """(idle, busy) CPU seconds of the whole machine so far (None where the system does not say)."""
    try:
        import psutil

        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        return idle, sum(times) - idle
    except Exception:
        return None


def _children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's live children (the run's data workers)."""
    try:
        import psutil

        total = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:  # exited meanwhile
                pass
        return total
    except Exception:
        return 0.0


class ThreadGovernor:
    """Runs `budget` compute threads and adapts them to the CPU the process gets (see the module docstring).

    `check()` is cheap: call it once per batch; it looks at the clocks every CHECK_INTERVAL_S. With `fixed` (the
    user set `threads`) the count never changes.
    """

    def __init__(self, budget: int, fixed: bool = False, interval: float = CHECK_INTERVAL_S):
        self.budget = max(1, int(budget))
        self.fixed = fixed
        self.interval = interval
        self.threads = self.budget
        self._mark = None

    def start(self) -> "ThreadGovernor":
        """Set the starting thread count (fewer than the budget when other tasks hold CPUs now, unless fixed)."""
        self.threads = self.budget if self.fixed else starting_threads(self.budget)
        if self.threads < self.budget:
            LOGGER.info(f"threads: {self.threads} of {self.budget} to start with (other tasks are running on the "
                        f"CPUs); more when a CPU is free")
        if torch.get_num_threads() != self.threads:  # torch's own default stays untouched where it agrees
            torch.set_num_threads(self.threads)
        return self.restart_interval()

    def restart_interval(self) -> "ThreadGovernor":
        """Measure the next interval from now (e.g. when the training loop starts, after set-up's idle waits)."""
        self._mark = self._clocks()
        return self

    @staticmethod
    def _clocks():
        """(wall, this process's CPU, its children's CPU, machine idle, machine busy) seconds; the machine's are
        None where the system does not say."""
        machine = _machine_cpu_seconds() or (None, None)
        return time.perf_counter(), time.process_time(), _children_cpu_seconds(), *machine

    def check(self) -> int:
        """Adapt the thread count when an interval has passed; returns the count in use."""
        if self.fixed or self.budget == 1 or self._mark is None:
            return self.threads
        if time.perf_counter() - self._mark[0] < self.interval:
            return self.threads
        now = self._clocks()
        wall = now[0] - self._mark[0]
        got = (now[1] - self._mark[1]) / wall
        if now[3] is None or self._mark[3] is None:  # nothing known of the machine: keep the count
            self._mark = now
            return self.threads
        idle = (now[3] - self._mark[3]) / wall
        others = max(0.0, (now[4] - self._mark[4]) / wall - got - (now[2] - self._mark[2]) / wall)
        chosen = decide_threads(self.threads, self.budget, got, others, idle)
        if chosen != self.threads:
            why = "other programs hold the CPUs" if chosen < self.threads else "a CPU is free again"
            LOGGER.info(f"threads: {chosen} ({why}: this process had {got:.2f} CPUs for {self.threads} threads, "
                        f"other programs {others:.2f}, idle {idle:.2f} over the last {wall:.1f} s)")
            self.threads = chosen
            torch.set_num_threads(chosen)
        self._mark = now
        return self.threads


def start_thread_governor(threads=None) -> ThreadGovernor:
    """The governor of this process, started (torch runs its threads from now on): `threads` fixed when given,
    else `OMP_NUM_THREADS` fixed when the environment sets it (the user's, or torchrun's for its workers), else
    this process's share of the CPUs among the local processes of its run, adapted under load."""
    from yolotrain.utils import dist

    fixed = threads or _env_threads()
    return ThreadGovernor(budget_threads(fixed, dist.local_world_size()), fixed=bool(fixed)).start()


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
