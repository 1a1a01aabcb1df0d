"""Telling an unavailable index from other errors, and saying so once per outage."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from dicom_node.errors import StorageError
from dicom_node.index_outage import IndexOutage, log_failure
from storage.database import unavailable_reason


def _raised(url: str, *statements: str) -> DBAPIError:
    """The error SQLAlchemy raises running ``statements`` in one transaction on ``url``."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    except DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"{statements} ran without error on {url}")


def _unopenable_database_error(tmp_path: Path) -> DBAPIError:
    error = _raised(f"sqlite:///{tmp_path}/no/such/folder/index.sqlite", "SELECT 1")
    assert isinstance(error, OperationalError), error
    return error


def _constraint_error() -> DBAPIError:
    error = _raised(
        "sqlite://",
        "CREATE TABLE t (id INTEGER PRIMARY KEY)",
        "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES (1)",
    )
    assert isinstance(error, IntegrityError), error
    return error


class _Conflict(Exception):
    """What psycopg raises for a serialization failure or deadlock: rolled back, retryable."""

    sqlstate = "40001"


def test_unavailable_reason_names_the_cause_and_only_for_outages(tmp_path: Path) -> None:
    outage = _unopenable_database_error(tmp_path)
    assert unavailable_reason(outage) == "unable to open database file"
    try:  # as the receiver raises it: a StorageError from the driver's error
        raise StorageError("index unavailable") from outage
    except StorageError as wrapped:
        assert unavailable_reason(wrapped) == "unable to open database file"
    assert unavailable_reason(_constraint_error()) is None
    assert unavailable_reason(OperationalError("UPDATE", {}, _Conflict())) is None
    assert unavailable_reason(ValueError("a defect")) is None
    assert unavailable_reason(StorageError("out of disk space")) is None


def test_an_outage_is_logged_once_and_its_end_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.outage")
    outage = IndexOutage("completion", log)
    error = _unopenable_database_error(tmp_path)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.succeeded()  # nothing to say while the index answers
        assert all(outage.failed(error) for _ in range(5))
        assert not outage.failed(ValueError("a defect"))  # the caller logs that itself
        outage.succeeded()
        outage.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "completion: index unavailable, retrying until it answers: unable to open database file",
        "completion: index available again after 0 s",
    ]
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]


def test_a_loop_that_cannot_tell_recovery_stays_quiet_about_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.outage")
    outage = IndexOutage("worker supervisor", log, announce_recovery=False)
    error = _unopenable_database_error(tmp_path)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.failed(error)
        outage.succeeded()
        outage.failed(error)  # a new outage (or the same, seen again): said again
    assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR"]


def test_a_one_off_failure_names_the_outage_or_keeps_the_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.outage")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for exc in (_unopenable_database_error(tmp_path), ValueError("a defect")):
            try:
                raise exc
            except Exception as caught:
                log_failure(log, caught, "could not record release of association %s", "a1")
    outage, defect = caplog.records
    assert outage.getMessage() == (
        "could not record release of association a1: index unavailable: "
        "unable to open database file"
    )
    assert outage.exc_info is None  # one line: no traceback
    assert defect.getMessage() == "could not record release of association a1"
    assert defect.exc_info is not None and defect.exc_info[0] is ValueError


def test_a_damaged_sqlite_file_is_an_outage_with_what_to_do(tmp_path: Path) -> None:
    """Not an OperationalError: every loop logged a traceback each round (twice a second)."""
    not_a_database = tmp_path / "index.sqlite"
    not_a_database.write_bytes(b"this is no SQLite file" * 300)
    error = _raised(f"sqlite:///{not_a_database}", "SELECT * FROM sqlite_master")
    assert not isinstance(error, OperationalError), error
    reason = unavailable_reason(error)
    assert reason is not None and reason.startswith("file is not a database: "), reason
    assert "the SQLite index file is damaged; stop the node and rebuild the index" in reason
    assert IndexOutage("completion", logging.getLogger("test")).failed(error)
