"""The CPU thread count follows other processes' load (train/threads.py)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch

from lmforge.train.threads import ThreadGovernor, _cpu_ticks, thread_governor, threads_for_load


@pytest.mark.parametrize(
    ("current", "others", "expected"),
    [
        (2, 0.0, 2),  # alone: all cores
        (2, 0.3, 2),  # a light neighbour (an editor, a browser tab): keep both
        (2, 0.67, 1),  # `yes` beside two spinning threads gets ~2/3 of a core
        (2, 1.0, 1),
        (2, 1.8, 1),  # never below one thread
        (1, 1.0, 1),  # the neighbour now has its core: stay
        (1, 0.5, 1),  # hysteresis: half a core is not enough to take a thread back
        (1, 0.1, 2),  # the neighbour stopped
    ],
)
def test_threads_for_load_on_two_cores(current: int, others: float, expected: int) -> None:
    assert threads_for_load(current, max_threads=2, cores=2, others=others) == expected


def test_never_above_the_configured_count() -> None:
    assert threads_for_load(1, max_threads=1, cores=8, others=0.0) == 1
    assert threads_for_load(2, max_threads=4, cores=8, others=0.0) == 4
    assert threads_for_load(4, max_threads=4, cores=8, others=5.6) == 2  # 2.4 free


class FakeMachine:
    """/proc readings: the machine's busy ticks grow by this process's plus the others'."""

    def __init__(self) -> None:
        self.now, self.busy, self.own, self.others = 0.0, 0, 0, 0.0

    def advance(self, seconds: float, own_cores: float) -> None:
        self.now += seconds
        self.own += round(own_cores * seconds * 100)
        self.busy += round((own_cores + self.others) * seconds * 100)


def test_governor_drops_a_thread_beside_a_neighbour_and_takes_it_back(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    m = FakeMachine()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gov = ThreadGovernor(2, read_ticks=lambda: (m.busy, m.own), clock=lambda: m.now)
        m.advance(1.0, own_cores=2.0)
        assert gov.update() is None  # checked at most every few seconds
        m.others = 0.67
        m.advance(3.0, own_cores=1.33)
        assert gov.update() == 1 and torch.get_num_threads() == 1
        m.others = 1.0
        m.advance(3.0, own_cores=1.0)
        assert gov.update() is None and gov.threads == 1
        m.others = 0.0
        m.advance(3.0, own_cores=1.0)
        assert gov.update() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_governor_off_when_asked_or_not_on_cpu_or_with_several_local_ranks(monkeypatch) -> None:
    assert thread_governor(False, torch.device("cpu")) is None
    assert thread_governor(True, torch.device("cuda")) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert thread_governor(True, torch.device("cpu")) is None


@pytest.mark.skipif(_cpu_ticks() is None, reason="needs Linux /proc/stat")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to share")
def test_a_real_busy_process_takes_a_thread() -> None:
    """`yes > /dev/null` beside an idle trainer: /proc shows a core busy, one thread is left."""
    old = torch.get_num_threads()
    neighbour = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        torch.set_num_threads(os.cpu_count() or 2)
        gov = ThreadGovernor(torch.get_num_threads(), check_every_s=1.0)
        time.sleep(1.5)
        assert gov.update() == (os.cpu_count() or 2) - 1
    finally:
        neighbour.kill()
        neighbour.wait()
        torch.set_num_threads(old)
