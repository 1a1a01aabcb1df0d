"""Wall-clock steps (NTP) while the node runs: series are neither held nor lost."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from sqlalchemy import select

import dicom_node.completion
import storage.instances
from dicom_node.completion import CompletionMonitor
from dicom_node.config import CompletionSettings
from storage.database import Index
from storage.models import Patient, Series, SeriesState, SeriesVersion, Study

QUIET_S = 30.0


class SteppedClock:
    """utcnow() for the modules under test: a wall clock the test moves (steps included)."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SteppedClock:
    stepped = SteppedClock(dt.datetime(2026, 3, 29, 0, 59, 0))
    monkeypatch.setattr(storage.instances, "utcnow", stepped)
    monkeypatch.setattr(dicom_node.completion, "utcnow", stepped)
    return stepped


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path / 'index.sqlite'}", fsync=False)


def _receiving(index: Index, last_received_at: dt.datetime) -> int:
    """A series version receiving, its last image stamped ``last_received_at``."""
    with index.session() as session, session.begin():
        patient = Patient(patient_id="P")
        study = Study(study_instance_uid="1.2.3", patient=patient)
        series = Series(series_instance_uid="1.2.3.4", study=study)
        version = SeriesVersion(
            series=series,
            instance_count=3,
            first_received_at=last_received_at,
            last_received_at=last_received_at,
        )
        session.add(version)
        session.flush()
        return version.id


def _state(index: Index, version_pk: int) -> SeriesState:
    with index.session() as session:
        state = session.scalar(select(SeriesVersion.state).where(SeriesVersion.id == version_pk))
    assert state is not None
    return state


def test_a_step_back_holds_a_series_for_its_quiet_period_not_the_step(
    index: Index, clock: SteppedClock
) -> None:
    """The last image came just before NTP set the clock back 10 min: the series completes
    about one quiet period after the step, not 10 min later."""
    monitor = CompletionMonitor(index, CompletionSettings(quiet_period_s=QUIET_S))
    pk = _receiving(index, clock.now)
    clock.advance(-600)
    assert monitor.check_once() == []
    clock.advance(QUIET_S + 1)
    assert [c.series_version_pk for c in monitor.check_once()] == [pk]
    assert _state(index, pk) == SeriesState.COMPLETE


@pytest.mark.parametrize("ahead_s", [1, 20, 59])
def test_a_small_skew_ahead_is_left_alone(
    index: Index, clock: SteppedClock, ahead_s: float
) -> None:
    """A receiver whose clock runs seconds ahead (several machines, one index): its series
    wait their quiet period as stamped. Moved back to this machine's "now", a series 20 s
    ahead was complete by its own clock 10 s after its last image, while it still received."""
    monitor = CompletionMonitor(index, CompletionSettings(quiet_period_s=QUIET_S))
    stamped = clock.now + dt.timedelta(seconds=ahead_s)
    pk = _receiving(index, stamped)
    assert monitor.check_once() == []
    with index.session() as session:
        assert (
            session.scalar(select(SeriesVersion.last_received_at).where(SeriesVersion.id == pk))
            == stamped
        )
    clock.advance(ahead_s + QUIET_S + 1)
    assert [c.series_version_pk for c in monitor.check_once()] == [pk]


def test_images_stamped_ahead_are_warned_of_once_not_at_every_check(
    index: Index, clock: SteppedClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Images stamped ahead (another machine on the index whose clock runs minutes ahead,
    or this clock set back): a WARNING per check (every 0.5 s) would bury the log."""
    monitor = CompletionMonitor(index, CompletionSettings(quiet_period_s=QUIET_S))
    pk = _receiving(index, clock.now + dt.timedelta(seconds=120))
    with caplog.at_level(logging.DEBUG, logger="dicom_node.completion"):
        assert monitor.check_once() == []
        for _ in range(3):
            with index.session() as session, session.begin():
                version = session.get(SeriesVersion, pk)
                assert version is not None
                version.last_received_at = clock.now + dt.timedelta(seconds=120)
            assert monitor.check_once() == []
    ahead = [r for r in caplog.records if "stamped ahead" in r.getMessage()]
    assert [r.levelno for r in ahead] == [logging.WARNING] + [logging.DEBUG] * 3
