"""How the supervisors start again, and stop, their child processes (workers, receivers).

A child process that keeps exiting as it starts is started again after a growing delay, not
every second; one that crashed after a while is started again at once. A worker is killed
for a cancelled or overrun job only while it still runs that job.

The processes here are stand-ins (already dead, or recording a kill), and the clock is the
test's: the supervisors' own code decides what to start or kill, and when.
"""

from __future__ import annotations

import logging
import multiprocessing
import types
from pathlib import Path

import pytest

from dicom_node.child_process import Restarts
from dicom_node.config import Settings
from dicom_node.service import Service
from dicom_node.worker import WorkerPool, _Slot
from storage.database import Index


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path / 'index.sqlite'}")


SCHEDULE = [0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_the_delay_doubles_while_it_exits_quickly_and_resets_after_a_long_run() -> None:
    restarts = Restarts()
    delays = []
    now = 0.0
    for _ in range(9):
        restarts.restarted(now)
        now += 5.0  # exits 5 s after each start
        delays.append(restarts.exited(now))
        now = restarts.due or now
    assert delays == SCHEDULE
    restarts.restarted(now)
    assert restarts.exited(now + Restarts.QUICK_S + 1) == 0.0  # it ran a while: a crash
    assert restarts.quick_exits == 0
    restarts.restarted(now)
    assert restarts.exited(now + 1, on_purpose=True) == 0.0  # stopped by its supervisor


class ExitedProcess:
    """A child process that has exited with status 1."""

    exitcode = 1
    pid = None

    def __init__(self, name: str) -> None:
        self.name = name

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass


def _start_times(supervise: object, clock: list[float], seconds: int) -> None:
    for second in range(seconds):
        clock[0] = float(second)
        supervise()  # type: ignore[operator]


def test_a_worker_that_exits_as_it_starts_is_started_again_later_and_later(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    starts: list[float] = []
    context = multiprocessing.get_context("spawn")

    class Pool(WorkerPool):
        def _spawn(self, number: int) -> _Slot:
            starts.append(clock[0])
            process = ExitedProcess(f"worker-{number}")
            return _Slot(process, context.Value("i", 0), context.Value("i", 0))  # type: ignore[arg-type]

    pool = Pool(Settings(), index, 1)
    pool._clock = lambda: clock[0]
    pool._slots = [pool._start(1)]
    caplog.set_level(logging.WARNING, logger="dicom_node.worker")
    _start_times(pool._supervise_once, clock, 200)  # one round a second, as _supervise
    # Started at 0, at once after its first exit, then 2, 4, 8, ... 60 s after each exit
    # (each seen one round after its start).
    assert starts == [0, 0, 3, 8, 17, 34, 67, 128, 189]
    assert "worker worker-1 exited (code 1); starting a new worker" in caplog.text
    assert (
        "worker worker-1 exited (code 1) 2 times in a row within 60 s of starting (its own "
        "log lines before each exit say why); starting it again in 2 s" in caplog.text
    )
    assert "starting it again in 60 s" in caplog.text


def test_a_receiver_process_that_exits_as_it_starts_is_started_again_later_and_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    starts: list[float] = []
    monkeypatch.setattr(
        "dicom_node.service.time", types.SimpleNamespace(monotonic=lambda: clock[0])
    )
    service = Service(Settings(storage={"data_dir": tmp_path}))  # not started: no port

    def spawn(number: int) -> ExitedProcess:
        starts.append(clock[0])
        return ExitedProcess(f"receiver-{number}")

    monkeypatch.setattr(service, "_spawn_receiver", spawn)
    service._children = [spawn(1)]  # type: ignore[list-item]
    service._restarts = [Restarts(started=0.0)]
    caplog.set_level(logging.WARNING, logger="dicom_node.service")
    _start_times(service.replace_dead_receivers, clock, 200)
    assert starts == [0, 0, 3, 8, 17, 34, 67, 128, 189]
    assert "receiver process receiver-1 exited (code 1); starting a new one" in caplog.text
    assert (
        "receiver process receiver-1 exited (code 1) 3 times in a row within 60 s of "
        "starting (its own log lines before each exit say why); starting it again in 4 s"
        in caplog.text
    )


class _Running(ExitedProcess):
    """A live worker process that records being killed."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.killed = False

    def is_alive(self) -> bool:
        return not self.killed

    def kill(self) -> None:
        self.killed = True


@pytest.mark.parametrize("why", ["cancelled", "timed out"])
def test_a_worker_that_moved_on_to_the_next_job_is_not_killed_for_the_last(
    index: Index, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the supervisor asks the index whether job 1 was cancelled, or once job 1 is over
    its time limit, its worker finishes it and claims job 2: job 2 must not be killed."""
    context = multiprocessing.get_context("spawn")
    process = _Running("worker-1")
    slot = _Slot(process, context.Value("i", 1), context.Value("i", 0))  # type: ignore[arg-type]
    clock = [0.0]

    class Pool(WorkerPool):
        def _cancelled(self, job_id: int) -> bool:
            if why == "timed out":
                return False
            slot.current.value = 2  # the worker moved on meanwhile
            return job_id == 1

    settings = Settings(workers={"job_timeout_s": 10})
    pool = Pool(settings, index, 1)
    pool._clock = lambda: clock[0]
    pool._slots = [slot]
    caplog.set_level(logging.INFO, logger="dicom_node.worker")
    pool._supervise_once()  # job 1 seen at 0 s
    if why == "timed out":
        clock[0] = 11.0
        real_kill = WorkerPool._kill_running

        def moved_on_first(slot_: _Slot, job: int) -> bool:
            slot_.current.value = 2  # finished job 1 just as its time ran out
            return real_kill(slot_, job)

        pool._kill_running = moved_on_first  # type: ignore[method-assign]
        pool._supervise_once()
    assert not process.killed
    assert pool._slots[0] is slot and slot.current.value == 2
    assert "stopping" not in caplog.text and not pool._to_fail
