"""The index on a real PostgreSQL server: what several machines sharing the work rely on."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import psutil
import pytest
from inprocess import inprocess_node
from peers import NodeProcess, free_port, storescu, wait_until
from pydicom import Dataset, dcmread
from pynetdicom import _config as pynetdicom_config
from random_headers import check_random_headers_are_stored
from sqlalchemy import text

from dicom_node.errors import DicomNodeError
from dicom_node.instance_attributes import instance_record
from storage.database import Index
from storage.filestore import FileStore
from storage.instances import (
    InstanceRecord,
    InstanceWriter,
    complete_due_series,
    record_instance,
)
from storage.queue import JobSpec, claim_job, create_job
from storage.retention import delete_series

pytestmark = pytest.mark.peers


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.skip(f"PostgreSQL server ({name}) not installed: apt-get install postgresql")
    return found[-1]


def _as_postgres_user() -> list[str]:
    """Commands prefix: the server refuses to run as root, so drop to the postgres user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop privileges for PostgreSQL")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user")
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


class PostgresServer:
    """A throwaway PostgreSQL server (initdb in a temporary folder), which a test may stop
    and start again on the same data and port, as an operator's maintenance would."""

    def __init__(self, *, listen: str = "127.0.0.1", netns: str | None = None) -> None:
        initdb, self._server = _pg_bin("initdb"), _pg_bin("postgres")
        self._listen = listen
        self._prefix = _as_postgres_user()
        if netns is not None:  # the server on another "machine" (see NetworkPartition)
            self._prefix = ["ip", "netns", "exec", netns, *self._prefix]
        # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self._data, self._sockets = self.folder / "data", self.folder / "run"
        self._sockets.mkdir()
        if self._prefix:
            shutil.chown(self.folder, "postgres")
            shutil.chown(self._sockets, "postgres")
        subprocess.run(
            [*self._prefix, initdb, "-D", str(self._data), "-A", "trust", "-U", "node",
             "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        if listen != "127.0.0.1":
            with open(self._data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {listen}/24 trust\n")
        self.port = free_port()
        self.url = f"postgresql+psycopg://node@{listen}:{self.port}/postgres"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.folder / "postgres.log", "ab") as log:
            self._proc = subprocess.Popen(
                [*self._prefix, self._server, "-D", str(self._data), "-p", str(self.port),
                 "-k", str(self._sockets), "-c", f"listen_addresses={self._listen}",
                 "-c", "fsync=on"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(self._ready, timeout_s=60, interval_s=0.2, what="PostgreSQL")

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError((self.folder / "postgres.log").read_text())
        probe = Index(self.url, migrate=False)
        try:
            probe.engine.connect().close()
        except Exception:
            return False
        finally:
            probe.dispose()  # a pooled connection left open stalls the smart shutdown below
        return True

    def stop(self) -> None:
        """Fast shutdown: clients are disconnected, as when a server is restarted. (A smart
        one waits for every client, and engines the tests dropped keep pooled connections
        until garbage collection.)"""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            self._proc.wait(timeout=60)
        self._proc = None

    def freeze(self) -> None:
        """Stop every server process (SIGSTOP) but leave its sockets open: the kernel still
        ACKs, nothing answers, as on a server whose disk or VM has stalled."""
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):  # a backend that just ended
                proc.suspend()

    def thaw(self) -> None:
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()

    def _processes(self) -> list[psutil.Process]:
        if self._proc is None:
            return []
        try:
            root = psutil.Process(self._proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # the server has ended: stop() reaps it
            return []

    def remove(self) -> None:
        self.thaw()
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    server = PostgresServer()
    try:
        server.start()
        yield server.url
    finally:
        server.remove()


@pytest.fixture
def fresh_db(postgres_url: str) -> Iterator[str]:
    """An empty database per test on the shared server."""
    # Not a free port's number: one test's can be another's later, and its database exists.
    name = f"t{uuid.uuid4().hex[:16]}"
    admin = Index(postgres_url, migrate=False)
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"


def waiting_for_a_lock(url: str) -> bool:
    """Whether a session of the database at ``url`` waits for a lock now."""
    probe = Index(url, migrate=False)
    try:
        with probe.engine.connect() as conn:
            return bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    )
                ).scalar()
            )
    finally:
        probe.dispose()


def _mr_record(series: str, i: int, **values: Any) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{i}",
        series_instance_uid=series,
        study_instance_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"{series}/{i}.dcm",
        size_bytes=1,
        modality="MR",
        **values,
    )


def _record(index: Index, series: str, i: int, ae: str = "SCU") -> None:
    record_instance(index, _mr_record(series, i, calling_ae_title=ae))


def test_migrations_and_concurrent_receivers(fresh_db: str) -> None:
    index = Index(fresh_db)
    Index(fresh_db)  # a second process starting: migrating again is a no-op
    # Two receivers racing to create the same patient/study/series rows.
    errors: list[BaseException] = []

    def receive(offset: int) -> None:
        try:
            other = Index(fresh_db, migrate=False)
            for i in range(offset, 40, 2):
                _record(other, "1.2.3", i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    (done,) = complete_due_series(index, 0.0, on_release=False)
    assert done.instance_count == 40


def test_a_store_chosen_as_a_deadlock_victim_is_recorded_on_its_next_try(fresh_db: str) -> None:
    """PostgreSQL rolls one transaction of a deadlock back, as designed, to be run again.
    The receiver answered that one with 0xA700 'index unavailable: deadlock detected'. Here
    another transaction holds the second of the two series' versions a store locks (in
    series order), then waits for the first: the store, waiting longer, is the one rolled
    back, and its next try records it."""
    index = Index(fresh_db)
    writer = InstanceWriter(index)
    writer.record([_mr_record("1.2.3", 0), _mr_record("1.2.4", 0)])
    with index.engine.connect() as conn:
        versions = dict(
            conn.execute(
                text(
                    "SELECT s.series_instance_uid, v.id FROM series_versions v "
                    "JOIN series s ON s.id = v.series_pk"
                )
            ).all()
        )
    result = _deadlock_victim(
        index,
        lambda: writer.record([_mr_record("1.2.3", 1), _mr_record("1.2.4", 1)]),
        versions["1.2.3"],
        versions["1.2.4"],
    )
    assert not isinstance(result, BaseException), result
    with index.engine.connect() as conn:
        counts = conn.execute(
            text("SELECT instance_count FROM series_versions ORDER BY id")
        ).scalars()
        assert list(counts) == [2, 2]


def test_a_completion_check_chosen_as_a_deadlock_victim_completes_on_its_next_try(
    fresh_db: str,
) -> None:
    """The same for the completion check, which updates the due versions in key order."""
    index = Index(fresh_db)
    InstanceWriter(index).record([_mr_record("1.2.3", 0), _mr_record("1.2.4", 0)])
    with index.engine.connect() as conn:
        first, second = conn.execute(text("SELECT id FROM series_versions ORDER BY id")).scalars()
    result = _deadlock_victim(
        index, lambda: complete_due_series(index, 0.0, on_release=False), first, second
    )
    assert isinstance(result, list), result
    assert sorted(done.series_instance_uid for done in result) == ["1.2.3", "1.2.4"]


def test_a_series_deleted_while_an_image_of_it_arrives_is_kept(
    fresh_db: str, tmp_path: Path
) -> None:
    """`series delete` checked that no version was receiving, then an image opened a new
    one before the delete committed: the operator got a traceback (ForeignKeyViolation).
    Now the series is kept, with the image, and the refusal says why: the delete locks the
    series row before it checks, so it waits for the image's transaction and then sees the
    version that image opened."""
    index = Index(fresh_db)
    writer = InstanceWriter(index)
    writer.record([_mr_record("1.2.3", 0)])
    complete_due_series(index, 0.0, on_release=False)
    arrived, deleting = threading.Event(), threading.Event()

    def hold_the_commit() -> None:
        arrived.set()
        deleting.wait(timeout=10)
        time.sleep(0.5)  # the delete is under way, waiting for this transaction

    store = threading.Thread(
        target=lambda: writer.record([_mr_record("1.2.3", 1)], before_commit=hold_the_commit)
    )
    store.start()
    arrived.wait(timeout=10)
    deleting.set()
    with pytest.raises(DicomNodeError, match="version 2 is still receiving: wait until it"):
        delete_series(index, FileStore(tmp_path / "store"), "1.2.3")
    store.join(timeout=30)
    with index.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT version, state, instance_count FROM series_versions ORDER BY version")
        ).all()
    assert [tuple(row) for row in rows] == [(1, "complete", 1), (2, "receiving", 1)]


def _deadlock_victim(index: Index, call: Callable[[], object], first: int, second: int) -> object:
    """What ``call`` returns, or raises, when it locks version row ``first`` and then
    ``second`` while another transaction holds ``second`` and then asks for ``first``.
    PostgreSQL rolls one of the two back; ``call``, waiting longer, is the one."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # returned to the test
            outcome.append(exc)

    other = index.engine.connect()
    touch = text("UPDATE series_versions SET last_association_id = 'x' WHERE id = :id")
    try:
        other.execute(touch, {"id": second})
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.5)  # ``call`` holds ``first`` and waits for ``second``
        other.execute(touch, {"id": first})  # the deadlock
        other.commit()
    finally:
        other.close()
    thread.join(timeout=30)
    (result,) = outcome
    return result


LONG_VALUES = {
    # Malformed or longer than their VR allows, as some senders write them.
    "patient_name": "Yamada^Tarou=" + "山田^太郎" * 80,
    "patient_id": "P" * 80,
    "patient_birth_date": "1970-01-01",
    "study_date": "2024-05-17",
    "accession_number": "A" * 80,
    "study_description": "d" * 300,
    "series_description": "Leber \u2013 nativ " * 30,  # an en dash, as German sites write
    "protocol_name": "p" * 300,
    "body_part_examined": "ABDOMEN" * 12,
    "image_type": "\\".join(["ORIGINAL", "PRIMARY"] * 20),
    "frame_of_reference_uid": "1.2." + "3" * 80,
    "image_orientation": "\\".join(["0.99999999999999999999999999999"] * 6) * 2,
}


def test_header_values_longer_than_their_columns_are_indexed(fresh_db: str) -> None:
    """PostgreSQL enforces column lengths (SQLite does not): a birth date written
    1970-01-01 or an overlong description used to fail the store with 0xA700 on every
    retry. The index keeps as much as its column holds; the file keeps the bytes sent."""
    index = Index(fresh_db)
    record = _mr_record("1.2.3", 1, **LONG_VALUES)
    record_instance(index, record)
    row = _indexed(
        index,
        "p.patient_name, p.patient_id, p.birth_date, st.study_date, st.accession_number, "
        "st.study_description, se.series_description, se.protocol_name, "
        "se.body_part_examined, se.image_type, se.frame_of_reference_uid, i.image_orientation",
    )
    for value, (name, sent) in zip(row, LONG_VALUES.items(), strict=True):
        assert value and sent.startswith(value), name
    assert row[2] == "1970-01-"  # the column holds 8 characters
    assert len(row[5]) == 256


def test_nul_characters_inside_header_values_are_left_out_of_the_index(fresh_db: str) -> None:
    """PostgreSQL refuses NUL in text ('PostgreSQL text fields cannot contain NUL (0x00)
    bytes'): a device that leaves one inside a value failed every store with 0xA700."""
    index = Index(fresh_db)
    record = _mr_record(
        "1.2.3",
        1,
        patient_name="Doe^Jane\x00\x00garbage",
        study_description="Abdomen\x00",
        series_description="VIBE\x00dixon",
        image_type="ORIGINAL\\PRIMARY\x00\\M",
    )
    record_instance(index, record)
    row = _indexed(
        index, "p.patient_name, st.study_description, se.series_description, se.image_type"
    )
    assert tuple(row) == ("Doe^Janegarbage", "Abdomen", "VIBEdixon", "ORIGINAL\\PRIMARY\\M")


def _indexed(index: Index, columns: str) -> Any:
    """``columns`` of the one instance indexed, with its series (se), study (st) and
    patient (p) rows."""
    with index.engine.connect() as conn:
        return conn.execute(
            text(
                f"SELECT {columns} FROM instances i JOIN series se ON i.series_pk = se.id "
                "JOIN studies st ON se.study_pk = st.id JOIN patients p ON st.patient_pk = p.id"
            )
        ).one()


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # "-999999999999", as meant
def test_header_numbers_beyond_postgresqls_integer_are_indexed_as_absent(
    fresh_db: str,
) -> None:
    """An IS of 12 digits is a valid string but no valid IS (DICOM: 32 bits): PostgreSQL's
    integer column refused it ('integer out of range'), and the store got 0xA700 on every
    retry. It is indexed as absent; the file keeps it."""
    index = Index(fresh_db)
    ds = Dataset()
    ds.InstanceNumber = "999999999999"
    ds.SeriesNumber = "-999999999999"
    ds.NumberOfFrames = "999999999999"
    reread = dcmread(BytesIO(_encoded(ds)), force=True)  # raw elements, as received
    uids = {"SOPInstanceUID": "1.2.3.1", "SeriesInstanceUID": "1.2.3", "StudyInstanceUID": "1.2"}
    record = instance_record(
        reread,
        uids,
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.1.2.1",
        "1.2.3/1.dcm",
        1,
        calling_ae_title="SCU",
        peer_address="127.0.0.1",
        association_id="a",
    )
    record_instance(index, record)
    with index.engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT i.instance_number, i.number_of_frames, se.series_number "
                "FROM instances i JOIN series se ON i.series_pk = se.id"
            )
        ).one()
    assert tuple(row) == (None, 1, None)


def _encoded(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True)
    return out.getvalue()


def test_each_job_is_claimed_by_exactly_one_worker(fresh_db: str) -> None:
    index = Index(fresh_db)
    job_ids = []
    for n in range(12):
        _record(index, f"1.2.{n}", 0)
    for done in complete_due_series(index, 0.0, on_release=False):
        job_id = create_job(index, done.series_version_pk, JobSpec("r", "demo", {}, []))
        assert job_id is not None
        job_ids.append(job_id)
    claimed: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        mine = Index(fresh_db, migrate=False)
        try:
            while (job := claim_job(mine, f"host-{name}:1", heartbeat_timeout_s=600)) is not None:
                claimed[name].append(job.id)
        except BaseException as exc:  # a worker dying under contention is a failure too
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in claimed]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    everything = sorted(j for ids in claimed.values() for j in ids)
    assert everything == sorted(job_ids)  # all claimed, none twice


def test_the_node_serves_on_postgresql(
    fresh_db: str, node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    from peers import make_mr_series

    node = node_factory(overrides={"storage": {"database_url": fresh_db}})
    series = make_mr_series(tmp_path / "series", 12)
    sent = storescu(node.port, [tmp_path / "series"])
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def complete() -> bool:
        listed = node.cli_json("series", "list", "--json")
        return bool(listed) and listed[0]["state"] == "complete"

    wait_until(complete, timeout_s=60, interval_s=1, what="series complete")
    listed = node.cli_json("series", "list", "--json")
    assert listed[0]["series_instance_uid"] == series.series_instance_uid
    assert listed[0]["instances"] == 12
    assert not (node.data_dir / "index.sqlite").exists()  # the index is in PostgreSQL


def test_a_series_is_segmented_and_returned_on_postgresql(
    fresh_db: str,
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """The whole way on a PostgreSQL index, as machines sharing the work run it: storescu
    sends, the series completes, the job is queued, claimed and run, its SEG recorded and
    delivered to Orthanc; jobs, deliveries and status read back from PostgreSQL."""
    from e2e import fetch, phantom_series, pipeline, scanner_node_and_pacs, source_series_of
    from e2e import wait_for_seg as seg_in_pacs

    settings = pipeline(destinations=["pacs"])
    settings["storage"] = {"database_url": fresh_db}
    node, orthanc = scanner_node_and_pacs(node_factory, orthanc_factory, settings)
    series = phantom_series(tmp_path / "series", seed=7021)
    sent = storescu(node.port, [series.paths[0].parent], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    seg_path = fetch(orthanc, seg_in_pacs(orthanc, node), tmp_path / "seg.dcm")
    assert source_series_of(seg_path) == {series.uids.series_instance_uid}
    (job,) = node.cli_json("jobs", "list")
    assert (job["state"], job["attempts"]) == ("succeeded", 1), job
    shown = node.cli_json("jobs", "show", str(job["id"]))
    assert [d["state"] for d in shown["deliveries"]] == ["delivered"], shown
    assert shown["timings"]["inference_s"] > 0 and shown["destinations"] == ["pacs"]
    status = node.cli_json("status")
    assert status["jobs"] == {"succeeded": 1} and status["deliveries"] == {"delivered": 1}
    assert not (node.data_dir / "index.sqlite").exists()  # everything was in PostgreSQL


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom: not valid UIDs, as meant
def test_uids_longer_than_64_characters_on_postgresql(
    fresh_db: str, node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """The first schema held 64 characters, and PostgreSQL refused longer UIDs with 0xA700,
    which a sender retries forever. They are stored and indexed up to 255, as on SQLite."""
    from test_receive import check_malformed_uids

    node = node_factory(overrides={"storage": {"database_url": fresh_db}})
    check_malformed_uids(node, tmp_path)
    assert not (node.data_dir / "index.sqlite").exists()


def test_migration_0002_widens_uid_columns_and_keeps_rows(fresh_db: str) -> None:
    """An index made by the first schema, with rows in it, upgraded as a node's start does."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    from storage.database import MIGRATIONS_DIR

    old = Index(fresh_db, migrate=False)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with old.engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0001")
    _record(old, "1.2.3", 1)
    old.dispose()

    index = Index(fresh_db)  # upgrades to head
    long = "1.2.826.0.1.3680043.8.498." + "5" * 200
    _record(index, long, 1)
    with index.engine.connect() as conn:
        widths = dict(
            conn.execute(
                text(
                    "SELECT table_name || '.' || column_name, character_maximum_length "
                    "FROM information_schema.columns WHERE column_name IN ('study_instance_uid',"
                    " 'series_instance_uid', 'sop_instance_uid', 'frame_of_reference_uid')"
                    " AND table_name IN ('studies', 'series', 'instances')"  # not our SEG's UIDs
                )
            ).all()
        )
        uids = conn.execute(text("SELECT sop_instance_uid FROM instances ORDER BY id")).scalars()
        assert list(uids) == ["1.2.3.1", f"{long}.1"]
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert widths == {
        "studies.study_instance_uid": 255,
        "series.series_instance_uid": 255,
        "series.frame_of_reference_uid": 255,
        "instances.sop_instance_uid": 255,
        "instances.frame_of_reference_uid": 255,
    }
    assert version == ScriptDirectory.from_config(cfg).get_current_head()  # and on to the last
    index.dispose()


def test_retention_on_postgresql(fresh_db: str, tmp_path: Path) -> None:
    """The grouped candidate query and per-series deletes, on PostgreSQL."""
    from test_retention import check_prune

    from storage.filestore import FileStore

    index = Index(fresh_db)
    try:
        check_prune(index, FileStore(tmp_path / "store", 0, fsync=False))
    finally:
        index.dispose()


def test_store_check_on_postgresql(fresh_db: str, tmp_path: Path) -> None:
    """Re-indexing, settling and forgetting rows, on PostgreSQL."""
    from test_store_check import check_repair_and_forget

    from storage.filestore import FileStore

    index = Index(fresh_db)
    try:
        check_repair_and_forget(index, FileStore(tmp_path / "store", 0, fsync=False), tmp_path)
    finally:
        index.dispose()


def test_cancel_on_postgresql(fresh_db: str) -> None:
    """Cancelling jobs, and finish_job's row lock, on PostgreSQL."""
    from test_jobs_and_routing import check_cancel

    index = Index(fresh_db)
    try:
        check_cancel(index)
    finally:
        index.dispose()


def test_index_outage_refuses_stores_and_the_node_recovers(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """The PostgreSQL server restarted under a running node (maintenance, failover): stores
    are refused with 0xA700 and nothing of them is kept; every loop says once that the index
    is unavailable (no traceback per round) and once that it is back; a worker that dies
    meanwhile is replaced; afterwards the node works without a restart."""
    from peers import acknowledged_files, echoscu, make_mr_series

    server = PostgresServer()
    try:
        server.start()
        node = node_factory(
            overrides={"storage": {"database_url": server.url}, "workers": {"processes": 1}}
        )
        ready = re.compile(r"worker \S+:(\d+) ready")
        worker_pid = int(
            wait_until(
                lambda: ready.search(node.log_text()), timeout_s=120, what="the worker"
            ).group(1)
        )
        before = make_mr_series(tmp_path / "before", 4)
        assert storescu(node.port, [tmp_path / "before"]).returncode == 0

        outage_starts = len(node.log_text())
        server.stop()
        during = make_mr_series(tmp_path / "during", 3)
        refused = storescu(node.port, [tmp_path / "during"], extra_args=["-v"])
        assert acknowledged_files(refused.stdout + refused.stderr) == []
        node.wait_for_log("refused (0xA700): index unavailable")
        os.kill(worker_pid, signal.SIGKILL)
        node.wait_for_log("worker worker-1 exited")
        for loop in ("completion", "scheduler", "outbox", "worker supervisor"):
            node.wait_for_log(f"{loop}: index unavailable, retrying until it answers")
        replacement = re.compile(rf"worker \S+:(?!{worker_pid}\b)\d+: index unavailable")
        wait_until(
            lambda: replacement.search(node.log_text()),
            timeout_s=60,
            what="the replacement worker's outage line",
        )
        assert echoscu(node.port).returncode == 0  # the node itself is up
        status = node.cli("status")  # what an operator (or Docker's health check) sees
        assert status.returncode != 0
        assert "index unavailable at postgresql" in status.stderr, status.stderr
        assert "Traceback" not in status.stderr
        time.sleep(2)  # four more rounds of every loop: still one line each
        outage_log = node.log_text()[outage_starts:]
        assert "Traceback" not in outage_log, outage_log[-3000:]
        for loop in ("completion", "scheduler", "outbox", "worker supervisor"):
            assert outage_log.count(f"{loop}: index unavailable") == 1, outage_log[-3000:]

        server.start()
        for loop in ("completion", "scheduler", "outbox"):
            node.wait_for_log(f"{loop}: index available again after")
        sent = storescu(node.port, [tmp_path / "during"])
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def complete() -> bool:  # through the CLI: peers' helpers read a SQLite index
            listed = {row["series_instance_uid"]: row for row in node.cli_json("series", "list")}
            return all(
                uid in listed
                and listed[uid]["state"] == "complete"
                and listed[uid]["instances"] == count
                for uid, count in ((before.series_instance_uid, 4), (during.series_instance_uid, 3))
            )

        wait_until(complete, timeout_s=60, interval_s=0.5, what="both series complete")
        # No stray file of the refused stores (every file is settled: no grace period).
        checked = node.cli("store", "check", "--grace-s", "0")
        assert checked.returncode == 0, checked.stdout + checked.stderr

        server.stop()  # and a node stopped while the index is away says why, briefly
        assert node.stop() == 0
        assert "stopping WorkerPool: index unavailable" in node.log_text()
        assert "Traceback" not in node.log_text()[outage_starts:]
    finally:
        server.remove()


class NetworkPartition:
    """The index server on its own network (a namespace joined by a veth pair), whose link
    can be cut: packets to it are then dropped without an answer, as when a switch, a
    firewall or a failed-over address leaves the node talking to nobody. Stopping the
    server instead would answer with a reset, which the node notices at once."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.netns = f"dnpg{tag}"
        self._host_if, self._server_if = f"vh{tag}", f"vn{tag}"
        net = f"10.213.{tag % 250}"
        self.server_ip = f"{net}.2"
        steps = [
            ["netns", "add", self.netns],
            ["link", "add", self._host_if, "type", "veth", "peer", "name", self._server_if],
            ["link", "set", self._server_if, "netns", self.netns],
            ["addr", "add", f"{net}.1/24", "dev", self._host_if],
            ["link", "set", self._host_if, "up"],
            ["-n", self.netns, "addr", "add", f"{self.server_ip}/24", "dev", self._server_if],
            ["-n", self.netns, "link", "set", self._server_if, "up"],
            ["-n", self.netns, "link", "set", "lo", "up"],
        ]
        for step in steps:
            done = subprocess.run(["ip", *step], capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                self.remove()
                pytest.skip(
                    f"cannot build a network namespace here (`ip {' '.join(step)}`: "
                    f"{done.stderr.strip()}); it needs root with CAP_NET_ADMIN"
                )

    def cut(self) -> None:
        self._ip("-n", self.netns, "link", "set", self._server_if, "down")

    def heal(self) -> None:
        self._ip("-n", self.netns, "link", "set", self._server_if, "up")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def remove(self) -> None:
        # Deleting the namespace deletes the veth pair with it.
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self._host_if], capture_output=True, timeout=30)


@pytest.fixture
def partition() -> Iterator[NetworkPartition]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    network = NetworkPartition()
    try:
        yield network
    finally:
        network.remove()


def test_a_partitioned_index_server_gets_0xA700_within_the_senders_timeout(
    node_factory: Callable[..., NodeProcess], tmp_path: Path, partition: NetworkPartition
) -> None:
    """The network to the index server goes silent under a running node. Its pooled
    connections would wait for the kernel's TCP retransmissions (~15 minutes) and every
    sender would time out; the node must answer 0xA700 while the sender (here with DCMTK's
    60 s DIMSE timeout) still waits, and work again once the network is back."""
    from peers import acknowledged_files, make_mr_series

    server = PostgresServer(listen=partition.server_ip, netns=partition.netns)
    try:
        server.start()
        node = node_factory(overrides={"storage": {"database_url": server.url}})
        make_mr_series(tmp_path / "before", 3)
        assert storescu(node.port, [tmp_path / "before"]).returncode == 0  # pool connected

        partition.cut()
        make_mr_series(tmp_path / "during", 1)
        refused = storescu(
            node.port, [tmp_path / "during"], extra_args=["-v", "-td", "60"], timeout_s=120
        )
        output = refused.stdout + refused.stderr
        assert "Received Store Response" in output, output[-2000:]  # not a DIMSE timeout
        assert acknowledged_files(output) == []
        node.wait_for_log("refused (0xA700): index unavailable")

        partition.heal()

        def stored_again() -> bool:
            sent = storescu(node.port, [tmp_path / "during"], extra_args=["-v", "-td", "60"])
            return len(acknowledged_files(sent.stdout + sent.stderr)) == 1

        wait_until(stored_again, timeout_s=120, interval_s=2, what="stores after the network")
    finally:
        server.stop()
        server.remove()


def test_a_hung_index_server_gets_0xA700_and_a_log_line_that_says_so(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """The index server stops answering while its host still ACKs (a stalled disk, a frozen
    VM; here SIGSTOP): no TCP timeout ever fires. The node must refuse with 0xA700 after
    storage.index_timeout_s, while the sender still waits, and log why; stop when told to,
    though a transaction still hangs (Python would wait for its thread at exit); and store
    again once the server answers, its store and index consistent."""
    from peers import acknowledged_files, make_mr_series

    server = PostgresServer()
    try:
        server.start()
        node = node_factory(
            overrides={"storage": {"database_url": server.url, "index_timeout_s": 5}}
        )
        make_mr_series(tmp_path / "before", 3)
        assert storescu(node.port, [tmp_path / "before"]).returncode == 0

        server.freeze()
        make_mr_series(tmp_path / "during", 1)
        started = time.monotonic()
        refused = storescu(
            node.port, [tmp_path / "during"], extra_args=["-v", "-td", "60"], timeout_s=120
        )
        output = refused.stdout + refused.stderr
        assert "Received Store Response" in output, output[-2000:]  # not a DIMSE timeout
        assert acknowledged_files(output) == []
        assert time.monotonic() - started < 30
        node.wait_for_log("refused (0xA700): the index did not answer within 5 s")

        assert node.stop() == 0  # within NodeProcess.stop's 60 s, else it is SIGKILLed
        assert "exiting with 1 store(s) still waiting for the index" in node.log_text()
        server.thaw()
        node.start()

        def stored_again() -> bool:
            sent = storescu(node.port, [tmp_path / "during"], extra_args=["-v", "-td", "60"])
            return len(acknowledged_files(sent.stdout + sent.stderr)) == 1

        wait_until(stored_again, timeout_s=120, interval_s=2, what="stores after the thaw")
        check = node.cli_json("store", "check", "--grace-s", "0")  # exits 1 if inconsistent
        assert check["consistent"] is True, check
        assert check["report"]["instances_checked"] == 4, check  # 3 before, 1 (once) after
    finally:
        server.remove()


@pytest.mark.filterwarnings("ignore")
def test_images_with_random_header_values_are_stored_on_postgresql(
    fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL enforces what SQLite lets by: column lengths, integer range, no NUL."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")  # as at INFO
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # as they are
    with inprocess_node(tmp_path / "data", database_url=fresh_db) as node:
        check_random_headers_are_stored(node, tmp_path, range(120))
