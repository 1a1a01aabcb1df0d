"""The receive path's index writer and group committer, on a real SQLite index.

The counts kept incrementally must equal a COUNT(*) of the instance rows in every case:
new instances, duplicates in the same version, an instance re-sent after completion (it
moves to the new version), concurrent stores, and one failing record among good ones.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from dicom_node.errors import DicomNodeError, StorageError
from storage.committer import GroupCommitter, _Pending
from storage.database import Index, unavailable_reason
from storage.filestore import FileStore
from storage.instances import (
    InstanceRecord,
    InstanceWriter,
    complete_due_series,
    mark_association_released,
)
from storage.retention import delete_series


def _rec(series: str, i: int | str, *, path: str | None = None) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{i}",
        series_instance_uid=series,
        study_instance_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=path if path is not None else f"1.2/{series}/{i}.dcm",
        size_bytes=1,
        calling_ae_title="SCU",
        peer_address="127.0.0.1:1",
    )


def _counts(index: Index) -> dict[tuple[str, int], tuple[int, int, str]]:
    """(series, version) -> (instance_count, COUNT(*) of its rows, state)."""
    with index.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT s.series_instance_uid, v.version, v.instance_count, v.state, "
                "(SELECT COUNT(*) FROM instances i WHERE i.series_pk = v.series_pk "
                "AND i.version = v.version) FROM series_versions v "
                "JOIN series s ON s.id = v.series_pk"
            )
        ).all()
    return {(r[0], r[1]): (r[2], r[4], r[3]) for r in rows}


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path / 'index.sqlite'}")


def test_counts_follow_duplicates_and_versions(index: Index) -> None:
    writer = InstanceWriter(index)
    writer.record([_rec("1.2.3", i) for i in range(3)])
    (again,) = writer.record([_rec("1.2.3", 1)])
    assert again.replaced and again.version == 1 and not again.new_version_opened
    assert _counts(index) == {("1.2.3", 1): (3, 3, "receiving")}

    complete_due_series(index, 0.0, on_release=False)
    late = writer.record([_rec("1.2.3", 5), _rec("1.2.3", 6), _rec("1.2.3", 0)])
    assert [r.version for r in late] == [2, 2, 2]
    assert [r.new_version_opened for r in late] == [True, False, False]
    assert late[2].replaced  # instance 0 moved from version 1 to version 2
    assert _counts(index) == {
        ("1.2.3", 1): (2, 2, "complete"),
        ("1.2.3", 2): (3, 3, "receiving"),
    }
    # A writer without the cache (another process) joins the open version.
    (other,) = InstanceWriter(index).record([_rec("1.2.3", 7)])
    assert other.version == 2 and not other.new_version_opened
    (moved,) = writer.record([_rec("1.2.3", 7, path="elsewhere.dcm")])
    assert moved.replaced_path == "1.2/1.2.3/7.dcm"
    assert _counts(index)[("1.2.3", 2)] == (4, 4, "receiving")


def test_concurrent_stores_commit_together(index: Index, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    committer = GroupCommitter(index)
    file_writer = ThreadPoolExecutor(max_workers=4)
    errors: list[Exception] = []

    def send(k: int) -> None:
        try:
            for i in range(30):
                relative = store.relative_path("1.2", f"9.{k % 2}", f"9.{k % 2}.{k}.{i}")
                ready = file_writer.submit(store.write_atomic, relative, b"DICM")
                committer.commit(_rec(f"9.{k % 2}", f"{k}.{i}", path=relative), ready)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert _counts(index) == {("9.0", 1): (60, 60, "receiving"), ("9.1", 1): (60, 60, "receiving")}
    assert len(list((tmp_path / "store").rglob("*.dcm"))) == 120


def test_one_bad_record_fails_alone(index: Index) -> None:
    committer = GroupCommitter(index)
    # NOT NULL violation: retried, then refused
    bad = replace(_rec("1.2.3", "bad"), path=None)  # type: ignore[arg-type]
    with pytest.raises(StorageError):
        committer.commit(bad)
    # In one batch: the good records are recorded, the bad one gets its own error.
    batch = [_rec("1.2.3", 1), bad, _rec("1.2.3", 2)]
    pending = [_Pending(record) for record in batch]
    committer._commit_batch(pending)
    assert [p.done for p in pending] == [True, True, True]
    assert pending[0].result is not None and pending[2].result is not None
    assert isinstance(pending[1].error, StorageError)
    assert _counts(index) == {("1.2.3", 1): (2, 2, "receiving")}


def test_a_batch_whose_commit_outcome_is_unknown_is_not_recorded_again(index: Index) -> None:
    """The connection lost during a batch's COMMIT: its rows may have committed. Recorded
    again one by one, each record would fail against the same lost index before its own
    commit and so be told its row surely did not commit (its store then removes its file)."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    from storage.instances import CommitOutcomeUnknown

    gone = threading.Event()

    def commit_then_lose_the_connection(conn: object) -> None:
        conn.connection.dbapi_connection.commit()  # type: ignore[attr-defined]
        gone.set()
        raise OperationalError("COMMIT", None, Exception("server closed the connection"))

    def refused(*_args: object) -> None:
        if gone.is_set():  # the index stays away: later statements fail before any commit
            raise OperationalError("SELECT", None, Exception("connection refused"))

    committer = GroupCommitter(index)
    pending = [_Pending(_rec("1.2.5", i)) for i in range(3)]
    event.listen(index.engine, "commit", commit_then_lose_the_connection)
    event.listen(index.engine, "before_cursor_execute", refused)
    try:
        committer._commit_batch(pending)
    finally:
        event.remove(index.engine, "commit", commit_then_lose_the_connection)
        event.remove(index.engine, "before_cursor_execute", refused)
    assert [type(p.error) for p in pending] == [CommitOutcomeUnknown] * 3
    assert _counts(index) == {("1.2.5", 1): (3, 3, "receiving")}  # it had committed


def test_rows_wait_for_their_files(index: Index) -> None:
    """A file still being synced on another thread holds its row back; a failed one drops it."""
    committer = GroupCommitter(index)
    syncing: Future[object] = Future()
    results: list[object] = []
    thread = threading.Thread(
        target=lambda: results.append(committer.commit(_rec("1.2.4", 1), syncing))
    )
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and _counts(index) == {}  # statements run, nothing committed
    syncing.set_result(None)
    thread.join(timeout=10)
    assert len(results) == 1 and _counts(index) == {("1.2.4", 1): (1, 1, "receiving")}

    failed: Future[object] = Future()
    failed.set_exception(StorageError("cannot write x.dcm: Input/output error"))
    with pytest.raises(StorageError, match="Input/output error"):
        committer.commit(_rec("1.2.4", 2), failed)
    assert _counts(index) == {("1.2.4", 1): (1, 1, "receiving")}

    # In one batch, only the record whose file failed is left out.
    done: Future[object] = Future()
    done.set_result(None)
    pending = [
        _Pending(_rec("1.2.4", 3), done),
        _Pending(_rec("1.2.4", 4), failed),
        _Pending(_rec("1.2.4", 5)),
    ]
    committer._commit_batch(pending)
    assert pending[0].result is not None and pending[2].result is not None
    assert isinstance(pending[1].error, StorageError)
    assert _counts(index) == {("1.2.4", 1): (3, 3, "receiving")}


def test_a_series_received_again_after_its_deletion_by_another_process(
    index: Index, tmp_path: Path
) -> None:
    """Each receiver process remembers its series' receiving version by key, and SQLite gives
    the keys of deleted rows again. Once another process had received a deleted series
    again, the stale memory passed the version check: images went to a version and series
    that were not theirs, or failed with 0xA700 (FOREIGN KEY constraint failed) until
    the process restarted."""
    first, second = InstanceWriter(index), InstanceWriter(index)
    first.record([_rec("1.2.3", 1)])
    complete_due_series(index, 0.0, on_release=False)
    first.record([_rec("1.2.3", 2)])  # version 2; `first` remembers it
    complete_due_series(index, 0.0, on_release=False)
    delete_series(index, FileStore(tmp_path / "store"), "1.2.3")
    # The other process: a new series takes the deleted series' key, 1.2.3 comes again.
    second.record([_rec("1.2.9", 1)])
    second.record([_rec("1.2.3", 3)])
    (again,) = first.record([_rec("1.2.3", 4)])
    assert again.version == 1
    assert _counts(index) == {
        ("1.2.9", 1): (1, 1, "receiving"),
        ("1.2.3", 1): (2, 2, "receiving"),
    }


def test_random_stores_completions_and_deletions_keep_the_counts(tmp_path: Path) -> None:
    """Model-based: two or three receiver processes' writers store random batches (an image
    may be sent again, to another series, or of another study), series complete, senders
    release, an operator deletes series. After each step every version's count equals its
    rows, each series has one receiving version at most, and no image is indexed twice.
    Seeds 250-349; the key-reuse defect above failed 3 of them."""
    failures: list[str] = []
    deleted = 0
    for seed in range(250, 350):
        rnd = random.Random(seed)
        index = Index(f"sqlite:///{tmp_path / f'index-{seed}.sqlite'}")
        store = FileStore(tmp_path / f"store-{seed}")
        writers = [InstanceWriter(index) for _ in range(rnd.randint(1, 3))]
        try:
            for _ in range(rnd.randint(5, 40)):
                deleted += _random_step(rnd, index, store, writers)
                problem = _inconsistency(index)
                if problem:
                    failures.append(f"seed {seed}: {problem}")
                    break
        except StorageError as exc:
            failures.append(f"seed {seed}: {exc}")
        index.engine.dispose()
    assert failures == []
    assert deleted > 50  # the deletions the seeds were chosen for did happen (203)


def _random_step(
    rnd: random.Random, index: Index, store: FileStore, writers: list[InstanceWriter]
) -> bool:
    """One random step; True if it deleted a series."""
    step = rnd.random()
    if step < 0.65:
        batch = []
        for _ in range(rnd.randint(1, 4)):
            series, sop = rnd.choice(["1.2.3", "1.2.4", "1.2.5"]), f"9.{rnd.randrange(12)}"
            batch.append(
                replace(
                    _rec(series, sop, path=f"p{rnd.randrange(3)}/{sop}"),
                    study_instance_uid=rnd.choice(["1.2", "1.2", "1.3"]),
                    association_id=f"a{rnd.randrange(3)}",
                    expected_count=rnd.choice([None, None, 3, 5]),
                )
            )
        rnd.choice(writers).record(batch)
    elif step < 0.8:
        complete_due_series(index, 0.0, on_release=False)
    elif step < 0.9:
        mark_association_released(index, f"a{rnd.randrange(3)}")
        complete_due_series(index, 3600.0, on_release=True)
    else:
        series = rnd.choice(["1.2.3", "1.2.4", "1.2.5"])
        complete_due_series(index, 0.0, on_release=False)
        try:
            delete_series(index, store, series)
        except DicomNodeError as exc:
            # Never sent, or deleted already. A refusal would be a failure: every version
            # was just completed, and no job exists.
            if "is not in the index" not in str(exc):
                raise
        else:
            return True
    return False


def _inconsistency(index: Index) -> str:
    counts = _counts(index)
    wrong = {key: value for key, value in counts.items() if value[0] != value[1]}
    receiving = Counter(series for (series, _), value in counts.items() if value[2] == "receiving")
    with index.engine.connect() as conn:
        twice = conn.execute(
            text("SELECT sop_instance_uid FROM instances GROUP BY 1 HAVING COUNT(*) > 1")
        ).all()
        lost = conn.execute(
            text(
                "SELECT COUNT(*) FROM instances i WHERE NOT EXISTS (SELECT 1 FROM series_versions"
                " v WHERE v.series_pk = i.series_pk AND v.version = i.version)"
            )
        ).scalar()
    if wrong or any(n > 1 for n in receiving.values()) or twice or lost:
        return f"counts {wrong}, receiving {receiving}, twice {twice}, without a version {lost}"
    return ""


def test_no_free_index_connection_is_a_storage_error_naming_it(index: Index) -> None:
    """Every pooled connection busy past the pool's own wait (30 s, longer than a
    ``storage.index_timeout_s`` above 30 allows) is the index unavailable: a StorageError
    (0xA700, one log line), not an unexpected error with a traceback."""
    index.engine = create_engine(index.url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    held = index.engine.connect()
    try:
        with pytest.raises(StorageError, match=r"index unavailable: .*timed out") as caught:
            InstanceWriter(index).record([_rec("1.2.3", 1)])
        assert unavailable_reason(caught.value) is not None
    finally:
        held.close()
    assert InstanceWriter(index).record([_rec("1.2.3", 1)])[0].version == 1
