"""CPU training that makes room for a busy neighbour: torch's thread count follows the load.

On a laptop something else always runs. Torch's OpenMP threads spin while they wait for each
other; when another process holds one of the cores, one of our threads is descheduled and every
parallel region waits for it (a 2-core machine beside ``yes > /dev/null``: the demo trains 3×
slower). ``OMP_WAIT_POLICY=PASSIVE`` helps beside the neighbour but costs ~20 % alone, and must
be set before torch starts. Fewer threads than free cores costs nothing then and keeps the full
speed of the cores we do get, so the training loop asks ``ThreadGovernor.update()`` at every
step: every few seconds it compares the machine's busy time (``/proc/stat``) with this
process's own (``/proc/self/stat``) and runs on the cores the others leave free
(bench/busy_neighbour.py measures it; README "Training beside a busy neighbour").

Hand-written: psutil would read the same two files, and the decision is lmforge's own.
Changing the thread count does not change the demo model's losses or gradients (tested:
identical bits at 1 and 2 threads), but some reductions may round differently at another
thread count: ``train.adapt_threads=false`` keeps the count fixed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

CHECK_EVERY_S = 3.0  # long enough for /proc's 10 ms ticks to average out a step's phases
# Hysteresis, in cores: drop a thread when the others' load leaves less than this much of a core
# for it, take it back only when they leave nearly a whole core (no flapping at the boundary).
DROP_BELOW, TAKE_ABOVE = 0.5, 0.8


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process) or None where /proc is absent."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        # user nice system idle iowait irq softirq steal (guest is already inside user)
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = int(own[11]), int(own[12])  # fields 14 and 15 of proc(5)
    except (OSError, ValueError, IndexError):
        return None
    # Niced work (``nice -n 19 make test``) yields its core to us at once (the scheduler
    # gives a nice-19 process ~1.5 % beside a nice-0 one), so it does not count as load unless
    # we run niced ourselves (then our own ticks are in that column too).
    busy = (
        user
        + system
        + irq
        + softirq
        + steal
        + (nice if os.getpriority(os.PRIO_PROCESS, 0) > 0 else 0)
    )
    return busy, utime + stime


def threads_for_load(current: int, max_threads: int, cores: int, others: float) -> int:
    """The thread count to run with when other processes keep ``others`` cores busy."""
    free = cores - others
    if free < current - 1 + DROP_BELOW or free >= current + TAKE_ABOVE:
        return max(1, min(max_threads, math.floor(free + 1 - DROP_BELOW)))
    return current


class ThreadGovernor:
    """Lowers torch's CPU thread count while other processes load the machine, and raises it
    back (up to the configured count) when they stop. ``update()`` is cheap: it reads /proc at
    most every ``CHECK_EVERY_S`` seconds."""

    def __init__(
        self,
        max_threads: int,
        read_ticks: Callable[[], tuple[int, int] | None] = _cpu_ticks,
        clock: Callable[[], float] = time.monotonic,
        check_every_s: float = CHECK_EVERY_S,
    ) -> None:
        self.max_threads, self.threads = max_threads, torch.get_num_threads()
        self.cores = os.cpu_count() or 1
        self._read, self._clock, self.check_every_s = read_ticks, clock, check_every_s
        self._last = (clock(), read_ticks())
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def update(self) -> int | None:
        """Adjust the thread count if the load changed; returns the new count, else None."""
        now = self._clock()
        if now - self._last[0] < self.check_every_s:
            return None
        ticks = self._read()
        (then, before), self._last = self._last, (now, ticks)
        if ticks is None or before is None:
            return None
        others = ((ticks[0] - before[0]) - (ticks[1] - before[1])) / self._hz / (now - then)
        threads = threads_for_load(self.threads, self.max_threads, self.cores, max(0.0, others))
        if threads == self.threads:
            return None
        torch.set_num_threads(threads)
        self.threads = threads
        return threads


def thread_governor(enabled: bool, device: torch.device) -> ThreadGovernor | None:
    """A governor for CPU training in one process, when ``enabled`` and /proc can be read.

    Not with several ranks on one machine: they already split the cores (``setup_device``) and
    would count each other as the neighbour.
    """
    if not enabled or device.type != "cpu" or int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
        return None
    if _cpu_ticks() is None:
        return None
    return ThreadGovernor(max_threads=torch.get_num_threads())
