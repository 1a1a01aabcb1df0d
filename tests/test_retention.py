"""Retention: `store prune` and the automatic sweep (real SQLite index and file store)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeFactory
from peers import make_mr_series, storescu, wait_until
from sqlalchemy import event, select, update
from sqlalchemy.exc import OperationalError

from dicom_node.errors import DicomNodeError
from storage.consistency import check_store
from storage.database import Index
from storage.filestore import FileStore
from storage.instances import InstanceRecord, complete_due_series, record_instance
from storage.models import (
    Delivery,
    DeliveryState,
    Instance,
    Patient,
    Series,
    SeriesVersion,
    Study,
    utcnow,
)
from storage.queue import (
    JobSpec,
    cancel_delivery,
    cancel_job,
    claim_delivery,
    claim_job,
    create_job,
    delivery_failed,
    finish_job,
)
from storage.retention import delete_series, parse_duration, prune

HOUR = dt.timedelta(hours=1)


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path / 'index.sqlite'}")


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store", 0, fsync=False)


def _receive(index: Index, store: FileStore, uid: str, study: str = "1.2", n: int = 2) -> None:
    for i in range(n):
        path = f"{study}/{uid}/{uid}.{i}.dcm"
        store.write_atomic(path, b"DICM" * 10)
        record_instance(
            index,
            InstanceRecord(
                sop_instance_uid=f"{uid}.{i}",
                series_instance_uid=uid,
                study_instance_uid=study,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=path,
                size_bytes=40,
                patient_id="P1",
                modality="MR",
            ),
        )


def _age(index: Index, hours: float) -> None:
    """Pretend every complete version finished ``hours`` ago."""
    with index.session() as session, session.begin():
        session.execute(
            update(SeriesVersion)
            .where(SeriesVersion.completed_at.is_not(None))
            .values(completed_at=utcnow() - dt.timedelta(hours=hours))
        )


def test_prune_takes_only_finished_old_series(index: Index, store: FileStore) -> None:
    check_prune(index, store)


def check_prune(index: Index, store: FileStore) -> None:
    """What prune takes and keeps; also run on PostgreSQL (test_postgres)."""
    _receive(index, store, "1.1")  # done long ago, job failed, delivery dead: pruned
    _receive(index, store, "1.2")  # done long ago but its job is still queued: kept
    _receive(index, store, "1.3", study="2.1")  # done recently: kept
    done = {c.series_instance_uid: c.series_version_pk for c in complete_due_series(
        index, 0.0, on_release=False)}  # fmt: skip
    _receive(index, store, "1.4", study="2.1")  # still receiving: kept
    _age(index, 48)
    with index.session() as session, session.begin():
        session.execute(
            update(SeriesVersion)
            .where(SeriesVersion.id == done["1.3"])
            .values(completed_at=utcnow() - dt.timedelta(minutes=5))
        )
    finished = create_job(index, done["1.1"], JobSpec("r", "demo", {}, ["pacs"]))
    create_job(index, done["1.2"], JobSpec("r", "demo", {}, ["pacs"]))
    job = claim_job(index, "w", heartbeat_timeout_s=60)
    assert job is not None and job.id == finished
    store.write_atomic(f"results/{job.id}/seg.dcm", b"SEG")
    store.write_atomic(f"results/{job.id}/fallback-binary.dcm", b"SEG")
    finish_job(index, job.id, seg_path=f"results/{job.id}/seg.dcm", seg_sop_instance_uid="9",
               timings={}, deliveries=[("pacs", "PACS@127.0.0.1:104")])  # fmt: skip
    delivery = claim_delivery(index, lease_s=60)
    assert delivery is not None
    busy = prune(index, store, HOUR)
    assert busy.series == []  # the delivery is still being sent, and the administrator
    assert (f"delivery {delivery.id} is sending: wait until it is delivered or dead"
            in dict(busy.kept)["1.1"])  # is told why the disk was not freed  # fmt: skip
    delivery_failed(index, delivery.id, "refused", retryable=False, max_attempts=1,
                    backoff_initial_s=1, backoff_max_s=1)  # fmt: skip

    dry = prune(index, store, HOUR, dry_run=True)
    assert dry.series == ["1.1"] and dry.instances == 2 and dry.bytes_freed == 80
    assert (store.root / "1.2/1.1/1.1.0.dcm").is_file()

    result = prune(index, store, HOUR)
    assert result.series == ["1.1"]
    assert not (store.root / "1.2/1.1").exists()  # images and their folder
    assert not (store.root / f"results/{job.id}").exists()  # and the SEG with its fallback
    with index.session() as session:
        left = sorted(session.scalars(select(Instance.sop_instance_uid)))
        studies = sorted(session.scalars(select(Study.study_instance_uid)))
        patients = session.scalars(select(Patient.patient_id)).all()
    assert left == ["1.2.0", "1.2.1", "1.3.0", "1.3.1", "1.4.0", "1.4.1"]
    assert studies == ["1.2", "2.1"] and patients == ["P1"]  # still referenced: kept
    assert prune(index, store, HOUR).series == []  # nothing else qualifies


def _resend(index: Index, store: FileStore) -> None:
    """Image 0 of series 1.2.3 sent again (same SOP Instance UID): its file, then its row."""
    _receive(index, store, "1.2.3", n=1)


def _acknowledged_image_kept(index: Index, store: FileStore) -> None:
    with index.session() as session:
        rows = session.scalars(select(Instance.path)).all()
    assert rows == ["1.2/1.2.3/1.2.3.0.dcm"]  # the image sent again is indexed
    assert store.absolute(rows[0]).is_file()  # and on disk
    assert check_store(index, store, grace_s=0).consistent


def test_an_image_sent_again_while_its_series_is_pruned_is_kept(
    index: Index, store: FileStore
) -> None:
    """Prune checked the series, then deleted its rows: an image sent again in between
    (acknowledged to the sender) was deleted with it. Prune now locks before it checks, so
    the image waits and lands in a new series."""
    _receive(index, store, "1.2.3")
    complete_due_series(index, 0.0, on_release=False)
    _age(index, 48)
    receiver = Index(index.engine.url.render_as_string(hide_password=False), migrate=False)
    sender: list[threading.Thread] = []

    def resend_during_the_prune(*_: object) -> None:
        if not sender:
            sender.append(threading.Thread(target=_resend, args=(receiver, store)))
            sender[0].start()
            sender[0].join(2)  # it commits now, unless the prune holds the index

    event.listen(index.engine, "before_cursor_execute", lambda *a: (
        resend_during_the_prune() if a[2].startswith("DELETE") else None
    ))  # fmt: skip
    assert prune(index, store, HOUR).series == ["1.2.3"]
    sender[0].join(30)
    assert not sender[0].is_alive()
    _acknowledged_image_kept(index, store)
    receiver.dispose()


def test_an_image_sent_again_as_its_series_files_are_removed_is_kept(
    index: Index, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files go after the rows' commit, by path: the image sent again in between was written
    at the same path, and prune removed it (its new row then named no file)."""
    _receive(index, store, "1.2.3")
    complete_due_series(index, 0.0, on_release=False)
    _age(index, 48)
    sent = []

    def resend_first(original: Any) -> Any:
        def remove(path: str, *args: Any) -> Any:
            if not sent and path.endswith("1.2.3.0.dcm"):
                sent.append(path)
                _resend(index, store)
            return original(path, *args)

        return remove

    monkeypatch.setattr(store, "remove", resend_first(store.remove))
    if hasattr(store, "remove_unchanged"):
        monkeypatch.setattr(store, "remove_unchanged", resend_first(store.remove_unchanged))
    assert prune(index, store, HOUR).series == ["1.2.3"]
    assert sent  # the image was sent again between the commit and the removal
    _acknowledged_image_kept(index, store)


class _Killed(BaseException):
    """The process dying (kill -9, power cut) at that point."""


def test_a_delete_cut_short_by_a_crash_is_finished_not_undone(
    index: Index, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows commit, then files go: a crash in between left files no row names, and
    `store check --repair` (the README's advice after a crash) indexed them again: a
    series deleted as the wrong patient's came back, partial, as complete."""
    from dicom_node.store_check import repair_store

    _receive(index, store, "1.2.3", n=6)
    complete_due_series(index, 0.0, on_release=False)
    removed: list[str] = []

    def dies_at_the_third(original: Any) -> Any:
        def remove(path: str, *args: Any) -> Any:
            if len(removed) == 2:
                raise _Killed
            removed.append(path)
            return original(path, *args)

        return remove

    monkeypatch.setattr(store, "remove", dies_at_the_third(store.remove))
    if hasattr(store, "remove_unchanged"):
        monkeypatch.setattr(store, "remove_unchanged", dies_at_the_third(store.remove_unchanged))
    with pytest.raises(_Killed):
        delete_series(index, store, "1.2.3")
    monkeypatch.undo()
    report = check_store(index, store, grace_s=0)
    assert report.unreferenced_images == []  # not taken for lost images
    assert len(report.interrupted_removals) == 1 and not report.consistent
    repaired = repair_store(index, store, report)
    assert (repaired.indexed, repaired.finished_removals) == (0, 1)
    with index.session() as session:
        assert session.scalars(select(Series.series_instance_uid)).all() == []
    assert not any(store.absolute("1.2/1.2.3").glob("*.dcm"))
    assert check_store(index, store, grace_s=0).consistent


def test_a_removal_record_whose_delete_never_committed_keeps_the_files(
    index: Index, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is written before the commit: a crash in between leaves the rows, and
    finishing the record must then keep their files."""
    from storage.retention import finish_removals

    _receive(index, store, "1.2.3", n=2)
    complete_due_series(index, 0.0, on_release=False)
    begin = store.begin_removal

    def record_then_die(*args: Any) -> str:
        begin(*args)
        raise _Killed

    monkeypatch.setattr(store, "begin_removal", record_then_die)
    with pytest.raises(_Killed):
        delete_series(index, store, "1.2.3")
    monkeypatch.undo()
    assert finish_removals(index, store) == 1
    with index.session() as session:
        paths = session.scalars(select(Instance.path)).all()
    assert len(paths) == 2 and all(store.absolute(path).is_file() for path in paths)
    assert check_store(index, store, grace_s=0).consistent


def test_a_retention_round_settles_a_removal_its_own_process_left(
    index: Index, store: FileStore, tmp_path: Path
) -> None:
    """A prune whose transaction failed after it wrote its removal record (the index went
    away mid-way) left the record: its files stay with their rows, but `store check` kept
    listing an interrupted removal until the node restarted, and no other node may finish
    a running node's record. The next retention round settles it."""
    from dicom_node.config import Settings
    from dicom_node.retention import RetentionSweeper

    _receive(index, store, "1.2.3")
    complete_due_series(index, 0.0, on_release=False)
    _age(index, 48)

    gone: list[str] = []

    def index_gone(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # From the delete on, the index is gone: the prune cannot settle its record itself.
        if statement.startswith("DELETE FROM instances") or (
            gone and statement.startswith("SELECT instances.path")
        ):
            gone.append(statement)
            raise OperationalError(statement, {}, Exception("server closed the connection"))

    event.listen(index.engine, "before_cursor_execute", index_gone)
    assert prune(index, store, HOUR).series == []
    event.remove(index.engine, "before_cursor_execute", index_gone)
    assert len(check_store(index, store, grace_s=0).interrupted_removals) == 1
    settings = Settings.model_validate(
        {"storage": {"data_dir": str(tmp_path / "data"), "retention": "1h"}}
    )
    RetentionSweeper(settings, index, store).sweep()
    report = check_store(index, store, grace_s=0)
    assert report.interrupted_removals == [] and report.consistent
    with index.session() as session:
        assert session.scalars(select(Series.series_instance_uid)).all() == []


def test_durations() -> None:
    assert parse_duration("30d") == dt.timedelta(days=30)
    assert parse_duration(" 1.5h ") == dt.timedelta(minutes=90)
    assert parse_duration("15m") == dt.timedelta(minutes=15)
    assert parse_duration("2D") == dt.timedelta(days=2)
    with pytest.raises(ValueError, match="ambiguous: m is minutes; for months give days"):
        parse_duration("6M")  # six months to an administrator, six minutes to the parser
    with pytest.raises(ValueError, match="more than 100 years"):
        parse_duration("1000000d")  # meant as "forever": now minus it is before year 1
    with pytest.raises(ValueError, match="use a number and s, m, h, d or w"):
        parse_duration("a month")


def test_a_bad_retention_setting_stops_the_node_at_start(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from dicom_node.config import Settings

    with pytest.raises(ValidationError, match="use a number and s, m, h, d or w"):
        Settings.model_validate({"storage": {"retention": "monthly"}})


@pytest.mark.peers
def test_the_node_prunes_by_itself(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(
        overrides={
            "completion": {"quiet_period_s": 1},
            "storage": {"retention": "2s", "retention_check_interval_s": 0.5},
        }
    )
    node.wait_for_log("retention: series finished more than 2s ago are pruned every 0.5 s")
    series = make_mr_series(tmp_path / "series", 3)
    assert storescu(node.port, [tmp_path / "series"]).returncode == 0
    line = node.wait_for_log("retention: pruned 1 series (3 images", timeout_s=60)
    assert "finished more than 2s ago" in line
    wait_until(lambda: node.stored_files() == [], timeout_s=10, what="the files gone")
    assert node.instance_rows() == [] and node.series_json() == []
    assert series.series_instance_uid in node.log_text()


def test_series_delete_says_why_it_keeps_a_series(index: Index, store: FileStore) -> None:
    _receive(index, store, "1.1")
    with pytest.raises(DicomNodeError, match="version 1 is still receiving: wait until"):
        delete_series(index, store, "1.1")
    [done] = complete_due_series(index, 0.0, on_release=False)
    job_id = create_job(index, done.series_version_pk, JobSpec("r", "demo", {}, ["pacs"]))
    assert job_id is not None
    with pytest.raises(DicomNodeError, match=f"job {job_id} is queued: .*jobs cancel {job_id}"):
        delete_series(index, store, "1.1")
    job = claim_job(index, "w", heartbeat_timeout_s=60)
    assert job is not None
    store.write_atomic(f"results/{job_id}/seg.dcm", b"SEG")
    finish_job(index, job_id, seg_path=f"results/{job_id}/seg.dcm", seg_sop_instance_uid="9",
               timings={}, deliveries=[("pacs", "PACS@127.0.0.1:104")])  # fmt: skip
    delivery = claim_delivery(index, lease_s=60)
    assert delivery is not None
    with pytest.raises(DicomNodeError, match=f"delivery {delivery.id} is sending: wait .* dead$"):
        delete_series(index, store, "1.1")
    assert cancel_delivery(index, delivery.id) == (DeliveryState.SENDING, False)  # in flight
    delivery_failed(index, delivery.id, "PACS down", retryable=True, max_attempts=5,
                    backoff_initial_s=600, backoff_max_s=600)  # fmt: skip
    with pytest.raises(DicomNodeError, match=f"pending: .*deliveries cancel {delivery.id}`"):
        delete_series(index, store, "1.1")
    assert cancel_delivery(index, delivery.id) == (DeliveryState.PENDING, True)
    assert claim_delivery(index, lease_s=60) is None  # never sent
    with index.session() as session:
        stopped = session.get(Delivery, delivery.id)
        assert stopped is not None and stopped.state == DeliveryState.CANCELLED
        assert stopped.last_error == "cancelled by the operator"

    # Unlike prune, no age: a series sent by mistake goes as soon as nothing uses it.
    result = delete_series(index, store, "1.1")
    assert result.series == ["1.1"] and result.instances == 2 and result.bytes_freed == 80
    assert list(store.root.iterdir()) == []  # images, SEG and their folders
    with index.session() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == []
        assert session.scalars(select(Patient.patient_id)).all() == []
    with pytest.raises(DicomNodeError, match=r"series 1\.1 is not in the index"):
        delete_series(index, store, "1.1")
    assert cancel_job(index, job_id) is None  # the job went with it
    assert cancel_delivery(index, delivery.id) is None  # and its delivery


@pytest.mark.peers
def test_series_delete_and_jobs_cancel_from_the_command_line(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(
        overrides={
            "completion": {"quiet_period_s": 1},
            "rules": [{"name": "mr", "match": {"modality": ["MR"]}, "model": "demo"}],
        }
    )  # no workers: the job stays queued
    series = make_mr_series(tmp_path / "series", 3)
    uid = series.series_instance_uid
    assert storescu(node.port, [tmp_path / "series"]).returncode == 0
    [job] = wait_until(lambda: node.cli_json("jobs", "list"), timeout_s=30, what="a job queued")
    assert job["state"] == "queued"

    refused = node.cli("series", "delete", "--yes", uid)
    assert refused.returncode == 1
    assert f"job {job['id']} is queued: wait for it, or `dicom-node jobs cancel {job['id']}`" in (
        refused.stderr
    )
    assert len(node.stored_files()) == 3
    unconfirmed = node.cli("series", "delete", uid)  # no terminal to say yes: nothing happens
    assert unconfirmed.returncode == 1 and len(node.stored_files()) == 3

    cancelled = node.cli("jobs", "cancel", str(job["id"]))
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job {job['id']} cancelled (was queued)" in cancelled.stdout
    again = node.cli("jobs", "cancel", str(job["id"]))
    assert again.returncode != 0 and "is cancelled already: nothing to cancel" in again.stderr
    shown = node.cli_json("jobs", "show", str(job["id"]))
    assert shown["reason"] == "cancelled by the operator (was queued)"

    unknown = node.cli("deliveries", "cancel", "999")
    assert unknown.returncode != 0 and "delivery 999 does not exist" in unknown.stderr

    deleted = node.cli("series", "delete", "--yes", uid)
    assert deleted.returncode == 0, deleted.stderr
    assert f"deleted series {uid}: 3 images" in deleted.stdout
    assert f"deleted series {uid}: 3 instances" in deleted.stderr  # the log line, for the audit
    assert node.stored_files() == [] and node.instance_rows() == []
    assert node.cli_json("jobs", "list") == [] and node.series_json() == []


def test_a_removal_failing_after_taking_its_images_aside_puts_them_back(
    index: Index, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal takes its images from their paths before it commits; one that fails after
    that (its commit too) must put them back at once, not leave acknowledged images
    under names no row knows until the next start."""
    _receive(index, store, "1.2.3", n=3)
    complete_due_series(index, 0.0, on_release=False)
    take_aside = store.take_aside

    def then_fail(*args: Any) -> None:
        take_aside(*args)
        raise RuntimeError("the index went away")

    monkeypatch.setattr(store, "take_aside", then_fail)
    with pytest.raises(RuntimeError):
        delete_series(index, store, "1.2.3")
    with index.session() as session:
        paths = session.scalars(select(Instance.path)).all()
    assert len(paths) == 3 and all(store.absolute(path).is_file() for path in paths)
    assert store.pending_removals() == {}
    assert check_store(index, store, grace_s=0).consistent


def test_a_crash_after_taking_images_aside_is_undone_at_the_next_start(
    index: Index, store: FileStore
) -> None:
    """Killed between taking its images aside and its commit: the rows still name the
    images, so finishing the record (a start, `store check --repair`) puts them back;
    `store check` meanwhile does not take them for lost images."""
    from storage.retention import finish_removals

    _receive(index, store, "1.2.3", n=2)
    with index.session() as session:
        paths = session.scalars(select(Instance.path)).all()
    images = [(path, store.inode(path) or 0) for path in paths]
    record = store.begin_removal(images, [])
    store.take_aside(record, paths)  # and the process dies here
    assert not any(store.absolute(path).exists() for path in paths)
    report = check_store(index, store, grace_s=0)
    assert report.unreferenced_images == [] and report.interrupted_removals == [record]
    assert report.missing == []  # held aside, not lost: the removal's to put back
    assert finish_removals(index, store) == 1
    assert all(store.absolute(path).is_file() for path in paths)
    assert check_store(index, store, grace_s=0).consistent


def test_store_check_tells_a_removal_under_way_elsewhere_from_an_interrupted_one(
    index: Index, store: FileStore
) -> None:
    """A removal whose process still runs (another node deleting a series now) is not a
    fault: `store check` listed it as "interrupted" and the store as NOT consistent."""
    import json
    import subprocess

    _receive(index, store, "1.2.3", n=2)
    with index.session() as session:
        paths = session.scalars(select(Instance.path)).all()
    record = store.begin_removal([(path, store.inode(path) or 0) for path in paths], [])
    store.take_aside(record, paths)
    running = subprocess.Popen(["sleep", "30"])
    try:
        content = json.loads(store.absolute(record).read_text())
        content["owner"]["pid"] = running.pid
        store.absolute(record).write_text(json.dumps(content))
        report = check_store(index, store, grace_s=0)
        assert report.removals_in_progress == [record]
        assert report.interrupted_removals == [] and report.unreferenced_images == []
        assert report.missing == [] and report.consistent
    finally:
        running.kill()
        running.wait()
    report = check_store(index, store, grace_s=0)  # its process gone: interrupted
    assert report.interrupted_removals == [record] and not report.consistent
