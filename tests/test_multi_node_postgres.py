"""Several machines sharing one PostgreSQL index: what each node does at the same moment as
another (starting, migrating, sending, claiming, removing), and what one machine's clock
means to the others. Each "machine" is an engine of its own on the throwaway server."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import test_postgres
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import event, text

from dicom_node.errors import StorageError
from dicom_node.outbox import release_interrupted
from dicom_node.worker import worker_id
from storage.database import (
    MIGRATIONS_DIR,
    Index,
    clock_skew_s,
    create_index_engine,
    upgrade,
    warn_of_clock_skew,
)
from storage.filestore import FileStore
from storage.instances import InstanceRecord, complete_due_series, record_instance
from storage.models import utcnow
from storage.queue import JobSpec, claim_delivery, claim_job, create_job, finish_job
from storage.retention import delete_series

# The throwaway server and per-test database of test_postgres, under their own names.
postgres_url = test_postgres.postgres_url
fresh_db = test_postgres.fresh_db


def _alembic() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _head() -> str | None:
    return ScriptDirectory.from_config(_alembic()).get_current_head()


def _migrate_to(url: str, revision: str) -> None:
    """The index as an older release left it."""
    engine = create_index_engine(url)
    with engine.begin() as connection:
        cfg = _alembic()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
    engine.dispose()


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = utcnow() + dt.timedelta(seconds=timeout_s)
    while not condition():
        assert utcnow() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.05)


def _start_node(url: str, inside: Any, go: Any, outcome: Any) -> None:
    """A node's start, in a process of its own (alembic's context is global to a process).
    With ``inside``, its migration stops, in its transaction, after its first CREATE or
    ALTER until ``go``."""
    engine = create_index_engine(url)
    if inside is not None:

        @event.listens_for(engine, "after_cursor_execute")
        def pause(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if not inside.is_set() and statement.lstrip().startswith(("CREATE", "ALTER")):
                inside.set()
                go.wait(60)

    try:
        upgrade(engine)
        outcome.put("started")
    except BaseException as exc:
        outcome.put(f"{type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


@pytest.mark.peers
@pytest.mark.parametrize("index_at", ["nothing", "0001"])
def test_nodes_starting_at_once_migrate_the_index_one_after_the_other(
    fresh_db: str, index_at: str
) -> None:
    """Two nodes started together on one index (compose up, a cluster restarted after an
    upgrade). The second created the tables the first was creating (UniqueViolation), or
    ran migration 0002 beside the first and could not move alembic_version from 0001
    (alembic's CommandError, not even a StorageError): that node did not start."""
    if index_at != "nothing":
        _migrate_to(fresh_db, index_at)
    processes = multiprocessing.get_context("spawn")
    inside, go, outcome = processes.Event(), processes.Event(), processes.Queue()
    first = processes.Process(target=_start_node, args=(fresh_db, inside, go, outcome))
    second = processes.Process(target=_start_node, args=(fresh_db, None, None, outcome))
    first.start()
    try:
        assert inside.wait(60), "the first node did not begin migrating"
        second.start()
        # The second waits for the first (for its lock, or on the rows it is writing).
        _wait_for(lambda: test_postgres.waiting_for_a_lock(fresh_db), "the second node to wait")
    finally:
        go.set()
    outcomes = sorted(outcome.get(timeout=60) for _ in range(2))
    for process in (first, second):
        process.join(30)
    assert outcomes == ["started", "started"]
    index = Index(fresh_db, migrate=False)
    with index.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert versions == [_head()]
    record_instance(index, _record("1.2.3", 0))  # the schema is whole
    index.dispose()


def test_an_index_a_newer_release_migrated_is_refused_with_a_storage_error(
    tmp_path: Path,
) -> None:
    """One machine upgraded first: an older node's start said alembic's CommandError
    (`Can't locate revision`), a traceback instead of the node's message."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = Index(url)
    with index.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    index.dispose()
    with pytest.raises(StorageError, match=r"cannot migrate the index at .*'9999'"):
        Index(url)


def _record(series: str, i: int, **values: Any) -> InstanceRecord:
    return dataclasses.replace(test_postgres._mr_record(series, i), **values)


def _delivery_being_sent(index: Index, sender: str | None) -> int:
    record_instance(index, _record("1.2.3", 0))
    (done,) = complete_due_series(index, 0.0, on_release=False)
    job_id = create_job(index, done.series_version_pk, JobSpec("r", "demo", {}, ["pacs"]))
    assert job_id is not None and claim_job(index, "host-a:1", heartbeat_timeout_s=60)
    assert finish_job(index, job_id, seg_path="results/1/seg.dcm", seg_sop_instance_uid="2.25.1",
                      timings={}, deliveries=[("pacs", "pacs")], worker="host-a:1")  # fmt: skip
    sending = claim_delivery(index, lease_s=300, sender=sender)
    assert sending is not None
    return sending.id


@pytest.mark.peers
@pytest.mark.parametrize(
    "sender", ["another-machine:77/0a1b2c3d4e5f", None], ids=["another machine", "unknown"]
)
def test_a_starting_node_leaves_another_machines_send_in_progress_alone(
    fresh_db: str, sender: str | None
) -> None:
    """Machine A's outbox is sending a SEG; machine B starts: it put A's delivery back to
    pending and sent it too, at the same time. A send of no known process (claimed before
    migration 0003) waits for its lease as well."""
    a, b = Index(fresh_db), Index(fresh_db, migrate=False)
    _delivery_being_sent(a, sender)
    assert release_interrupted(b) == 0
    assert claim_delivery(b, lease_s=300, sender=worker_id()) is None  # A's lease holds
    a.dispose()
    b.dispose()


@pytest.mark.peers
def test_a_node_restarted_after_a_crash_sends_its_own_interrupted_delivery_at_once(
    fresh_db: str,
) -> None:
    index = Index(fresh_db)
    its_old_self = worker_id(max(psutil.pids()) + 12345)  # this host, a process now gone
    delivery_id = _delivery_being_sent(index, its_old_self)
    assert release_interrupted(index) == 1
    again = claim_delivery(index, lease_s=300, sender=worker_id())
    assert again is not None and (again.id, again.attempts) == (delivery_id, 2)
    index.dispose()


@pytest.mark.peers
@pytest.mark.parametrize("layout", ["one study", "two studies of one patient"])
def test_series_removed_at_once_by_two_nodes_leave_no_empty_study_or_patient(
    fresh_db: str, tmp_path: Path, layout: str
) -> None:
    """Retention sweeps on two machines (or a `series delete` during one) remove two series
    at once. Each counted what remained of the study (or the patient) while the other's
    removal was not committed, saw it, and kept the study and patient rows for ever."""
    index = Index(fresh_db)
    studies = ["1.2", "1.2"] if layout == "one study" else ["1.2", "1.3"]
    for n, study in enumerate(studies, start=1):
        record_instance(
            index,
            _record(f"1.2.3.{n}", 0, study_instance_uid=study, patient_id="P1",
                    patient_name="Doe^J"),
        )  # fmt: skip
    complete_due_series(index, 0.0, on_release=False)
    counting = "SELECT count(series.id)" if layout == "one study" else "SELECT count(studies.id)"
    both_counted = threading.Barrier(2)
    store = FileStore(tmp_path / "store", 0, fsync=False)
    nodes = [Index(fresh_db, migrate=False) for _ in range(2)]
    for node in nodes:

        @event.listens_for(node.engine, "after_cursor_execute")
        def _meet(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            # Both counts before either commits: the interleaving that orphaned the rows.
            # Fixed, the second waits for the first's lock and never gets here in time.
            if statement.startswith(counting):
                with contextlib.suppress(threading.BrokenBarrierError):
                    both_counted.wait(timeout=3)

    removed: list[list[str]] = []
    errors: list[BaseException] = []

    def remove(node: Index, uid: str) -> None:
        try:
            removed.append(delete_series(node, store, uid).series)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=remove, args=(node, f"1.2.3.{n}"))
        for n, node in enumerate(nodes, start=1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(removed) == [["1.2.3.1"], ["1.2.3.2"]]
    with index.engine.connect() as conn:
        left = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM series), (SELECT count(*) FROM studies), "
                "(SELECT count(*) FROM patients)"
            )
        ).one()
    assert tuple(left) == (0, 0, 0)
    for each in (*nodes, index):
        each.dispose()


@pytest.mark.peers
def test_an_image_file_over_2_gib_is_indexed(fresh_db: str) -> None:
    """A large multi-frame or whole-slide file: PostgreSQL's INTEGER refused its size
    ("integer out of range"), and the store was refused."""
    index = Index(fresh_db)
    size = 2**31 + 10
    record_instance(index, _record("1.2.3", 0, size_bytes=size))
    with index.engine.connect() as conn:
        assert conn.execute(text("SELECT size_bytes FROM instances")).scalar() == size
    index.dispose()


@pytest.mark.peers
def test_the_migrated_schema_is_the_models_schema(fresh_db: str) -> None:
    """What the migrations build on PostgreSQL is what storage.models declares (a column
    added to a model needs its migration)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from storage.models import Base

    index = Index(fresh_db)
    with index.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    index.dispose()


@pytest.mark.peers
def test_the_clock_skew_to_the_index_server_is_measured_and_warned_of(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Quiet periods, heartbeats and leases compare timestamps that different machines'
    clocks wrote: a machine 90 s ahead completed series still arriving and took running
    jobs over. The node's start compares its clock with the server's."""
    index = Index(fresh_db)
    skew = clock_skew_s(index)
    assert skew is not None and abs(skew) < 1.0  # one machine: server and tests alike
    caplog.set_level(logging.WARNING, logger="storage.database")
    in_step = warn_of_clock_skew(index)
    assert in_step is not None and abs(in_step) < 1.0
    assert caplog.text == ""
    real = utcnow
    monkeypatch.setattr("storage.database.utcnow", lambda: real() + dt.timedelta(seconds=90))
    ahead = warn_of_clock_skew(index)
    assert ahead is not None and 89 < ahead < 91
    assert "this machine's clock is 90.0 s ahead of the index server's" in caplog.text
    assert "NTP" in caplog.text
    index.dispose()


def test_an_index_on_sqlite_has_no_clock_skew(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    assert clock_skew_s(index) is None
    assert warn_of_clock_skew(index) is None
    index.dispose()


@pytest.mark.peers
def test_a_claim_takes_the_next_job_while_another_worker_claims_the_first(
    fresh_db: str,
) -> None:
    """Every worker picked the oldest queued job and all but one lost it to the first
    claim's UPDATE, waiting on its row lock; after five such rounds claim_job gave up (None)
    while jobs were queued, and the workers slept a poll interval."""
    index = Index(fresh_db)
    ids = []
    for n in range(2):
        record_instance(index, _record(f"1.2.{n}", 0))
    for done in complete_due_series(index, 0.0, on_release=False):
        ids.append(create_job(index, done.series_version_pk, JobSpec("r", "demo", {}, [])))
    claimed: list[Any] = []
    with index.engine.connect() as other_worker:
        claiming = other_worker.begin()  # in the middle of its claim of the first job
        other_worker.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": ids[0]})
        worker = threading.Thread(
            target=lambda: claimed.append(claim_job(index, "host-b:1", heartbeat_timeout_s=600))
        )
        worker.start()
        worker.join(5)
        waited = worker.is_alive()
        claiming.rollback()
        worker.join(30)
    assert not waited, "the claim waited for the other worker's"
    assert claimed[0] is not None and claimed[0].id == ids[1]
    index.dispose()


class _Killed(BaseException):
    """The removing node dies (its process ends) at this point."""


def _finish_removals_elsewhere(url: str, root: str, host: str | None, outcome: Any) -> None:
    """Another node's start (or its `store check --repair`), in a process of its own;
    ``host``: that of another machine."""
    from storage import filestore
    from storage.retention import finish_removals

    if host is not None:
        filestore._HOST = host
    index = Index(url, migrate=False)
    try:
        outcome.put(finish_removals(index, FileStore(Path(root), 0, fsync=False)))
    except BaseException as exc:
        outcome.put(f"{type(exc).__name__}: {exc}")
    finally:
        index.dispose()


@pytest.mark.peers
@pytest.mark.parametrize("elsewhere", ["another machine", "another process of this machine"])
def test_a_starting_node_leaves_another_nodes_removal_in_progress_alone(
    fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, elsewhere: str
) -> None:
    """Node A deletes a series; node B starts meanwhile (or runs `store check --repair`).
    B finished A's removal record before A's delete committed: the rows still named the
    files, so B kept them and ended the record. A, dying after its commit and before it
    removed the files, then left files that no row and no record named: store check took
    them for lost images, and --repair indexed the deleted series again."""
    from storage.consistency import check_store
    from storage.retention import finish_removals

    index = Index(fresh_db)
    store = FileStore(tmp_path / "store", 0, fsync=False)
    for i in range(2):
        path = store.relative_path("1.2", "1.2.3", f"1.2.3.{i}")
        store.write_atomic(path, b"DICM")
        record_instance(index, _record("1.2.3", i, path=path, size_bytes=4))
    complete_due_series(index, 0.0, on_release=False)
    finished_by_b: list[object] = []
    processes = multiprocessing.get_context("spawn")

    @event.listens_for(index.engine, "after_cursor_execute")
    def _b_starts(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # A has written its record and is deleting the rows, not yet committed.
        if statement.startswith("DELETE FROM deliveries") and not finished_by_b:
            outcome = processes.Queue()
            host = "machine-b" if elsewhere == "another machine" else None
            b = processes.Process(
                target=_finish_removals_elsewhere, args=(fresh_db, str(store.root), host, outcome)
            )
            b.start()
            finished_by_b.append(outcome.get(timeout=60))
            b.join(30)

    def a_dies(*_args: Any) -> None:
        raise _Killed

    monkeypatch.setattr("storage.retention._remove_files", a_dies)
    with pytest.raises(_Killed):
        delete_series(index, store, "1.2.3")
    monkeypatch.undo()
    assert finished_by_b == [0]  # A's removal was A's to finish
    report = check_store(index, store, grace_s=0)
    assert report.unreferenced_images == []  # not taken for lost images
    assert len(report.interrupted_removals) == 1
    # A, started again, finishes it (its own, of a process gone; any node once it is stale).
    assert finish_removals(index, store) == 1
    assert not any(store.absolute("1.2/1.2.3").glob("*.dcm"))
    assert check_store(index, store, grace_s=0).consistent
    index.dispose()


def _removal_racing_a_store(
    fresh_db: str, tmp_path: Path, copy_written_when: str
) -> tuple[list[Any], FileStore, str, Index]:
    """Node A removes series 1.2.3 (a retention round, `series delete`); node B receives
    its image 0 again at that moment, through the receiver's group committer: its file is
    renamed into place, then its row waits for A's lock on the series.
    ``copy_written_when``: ``"before A takes its files"`` or ``"after"``. Returns B's
    outcome (Recorded or the exception), the store, the image's path and an index."""
    from concurrent.futures import Future

    from storage.committer import GroupCommitter
    from storage.filestore import WrittenFile

    a, b = Index(fresh_db), Index(fresh_db, migrate=False)
    store = FileStore(tmp_path / "store", 0, fsync=False)
    path = store.relative_path("1.2", "1.2.3", "1.2.3.0")
    store.write_atomic(path, b"OLD!")
    record_instance(a, _record("1.2.3", 0, path=path, size_bytes=4))
    complete_due_series(a, 0.0, on_release=False)
    paused, go = threading.Event(), threading.Event()
    take_aside = store.take_aside

    def pause_before(*args: Any) -> None:
        paused.set()
        go.wait(30)
        take_aside(*args)

    def pause_after(*args: Any) -> None:
        take_aside(*args)
        paused.set()
        go.wait(30)

    store.take_aside = pause_before if copy_written_when == "before" else pause_after  # type: ignore[method-assign]
    removal = threading.Thread(target=lambda: delete_series(a, store, "1.2.3"))
    removal.start()
    assert paused.wait(30)
    file_done: Future[WrittenFile] = Future()
    file_done.set_result(WrittenFile.of(store.write_atomic(path, b"NEW!")))  # B's copy
    outcome: list[Any] = []

    def receive() -> None:
        try:
            outcome.append(
                GroupCommitter(b).commit(_record("1.2.3", 0, path=path, size_bytes=4), file_done)
            )
        except Exception as exc:
            outcome.append(exc)

    receiving = threading.Thread(target=receive)
    receiving.start()
    _wait_for(lambda: test_postgres.waiting_for_a_lock(fresh_db), "B's row to wait for A's lock")
    go.set()
    removal.join(30)
    receiving.join(30)
    a.dispose()
    return outcome, store, path, b


@pytest.mark.peers
def test_an_image_sent_again_as_its_series_is_removed_is_refused_not_lost(
    fresh_db: str, tmp_path: Path
) -> None:
    """B's copy was renamed into place before A read its files: A took the inode of B's
    copy as the one to remove, committed, removed it, and B's row committed after (the
    series made anew): B acknowledged an image whose file was gone. Now A takes its files
    aside before it commits, and B, finding its file gone before its own commit, refuses
    the image (0xA700: the sender sends it again)."""
    from storage.consistency import check_store
    from storage.filestore import TakenByRemoval

    outcome, store, path, b = _removal_racing_a_store(fresh_db, tmp_path, "before")
    try:
        assert len(outcome) == 1 and isinstance(outcome[0], TakenByRemoval), outcome
        with b.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM instances")).scalar() == 0
        assert not store.absolute(path).exists()
        assert check_store(b, store, grace_s=0).consistent
        record_instance(b, _record("1.2.3", 0, path=path, size_bytes=4))  # sent again
    finally:
        b.dispose()


@pytest.mark.peers
def test_an_image_sent_again_after_its_series_files_are_taken_is_stored(
    fresh_db: str, tmp_path: Path
) -> None:
    """B's copy renamed into place after A took the series' files aside, before A's commit:
    B's row commits after A's (the series made anew) and names B's copy, which stays."""
    from storage.consistency import check_store

    outcome, store, path, b = _removal_racing_a_store(fresh_db, tmp_path, "after")
    try:
        assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome
        with b.engine.connect() as conn:
            assert conn.execute(text("SELECT path FROM instances")).scalars().all() == [path]
        assert store.absolute(path).read_bytes() == b"NEW!", "an acknowledged image is gone"
        assert check_store(b, store, grace_s=0).consistent
    finally:
        b.dispose()
