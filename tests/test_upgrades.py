"""Upgrading a node whose index an older release wrote: rows kept, work resumed, and an
upgrade cut short completed by the next start."""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_multi_node_postgres
import test_postgres
from peers import make_mr_series, storescp_to, wait_until
from sqlalchemy import Engine, text
from test_cli import DICOM_NODE

from dicom_node.config import Settings
from dicom_node.outbox import Outbox, release_interrupted
from storage.database import Index, create_index_engine
from storage.filestore import FileStore
from storage.instances import complete_due_series
from storage.models import utcnow
from storage.queue import claim_job

postgres_url = test_postgres.postgres_url
fresh_db = test_postgres.fresh_db

REPO = Path(__file__).resolve().parent.parent
TABLES = ("patients", "studies", "series", "series_versions", "instances", "jobs", "deliveries")


_head = test_multi_node_postgres._head
_migrate_to = test_multi_node_postgres._migrate_to


def _version(url: str) -> str | None:
    engine = create_index_engine(url)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    return None if version is None else str(version)


def _fill_as_an_older_release(engine: Engine, store: FileStore, tmp_path: Path) -> None:
    """Rows as the release of 0001/0002 wrote them (its columns only: no delivery sender):
    a complete series with jobs in each state and deliveries in each state, and a series
    still receiving; the images and the SEG in the store."""
    old = utcnow() - dt.timedelta(hours=1)
    done = make_mr_series(tmp_path / "done", 2, seed=1)
    receiving = make_mr_series(tmp_path / "receiving", 2, seed=2, study_instance_uid="1.2.9")
    seg = store.result_path(4, "seg.dcm")
    store.write_atomic(seg, done.paths[0].read_bytes())  # an image stands in for its SEG
    with engine.begin() as conn:

        def insert(table: str, **values: object) -> None:
            names = ", ".join(values)
            conn.execute(
                text(
                    f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + n for n in values)})"
                ),
                values,
            )

        insert("patients", id=1, patient_id="P1", patient_name="DOE^J", birth_date="", sex="")
        for pk, series, state in ((1, done, "complete"), (2, receiving, "receiving")):
            insert("studies", id=pk, study_instance_uid=series.study_instance_uid, patient_pk=1,
                   study_date="20240101", study_time="", accession_number="",
                   study_description="")  # fmt: skip
            insert("series", id=pk, series_instance_uid=series.series_instance_uid, study_pk=pk,
                   modality="MR", series_description="", protocol_name="",
                   body_part_examined="", image_type="", frame_of_reference_uid="",
                   calling_ae_title="SCANNER", peer_address="127.0.0.1", current_version=1,
                   created_at=old)  # fmt: skip
            insert("series_versions", id=pk, series_pk=pk, version=1, state=state,
                   instance_count=2, first_received_at=old, last_received_at=old,
                   last_association_id="a", association_released=False,
                   completed_at=old if state == "complete" else None,
                   completion_reason="quiet period" if state == "complete" else "",
                   routed_at=old if state == "complete" else None)  # fmt: skip
            for number, (sop, path) in enumerate(
                zip(series.sop_instance_uids, series.paths, strict=True), start=1
            ):
                relative = store.relative_path(
                    series.study_instance_uid, series.series_instance_uid, sop
                )
                store.write_atomic(relative, path.read_bytes())
                insert("instances", sop_instance_uid=sop, series_pk=pk, version=1,
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=number,
                       image_type="", frame_of_reference_uid="", image_orientation="",
                       image_position="", number_of_frames=1, path=relative,
                       size_bytes=path.stat().st_size, calling_ae_title="SCANNER",
                       peer_address="127.0.0.1", association_id="a",
                       received_at=old)  # fmt: skip
        jobs = (
            (1, "queued", "", None),
            (2, "running", "otherhost:1", old),  # its worker's heartbeat lapsed
            (3, "failed", "", old),
            (4, "succeeded", "", old),
        )
        for pk, state, worker, beat in jobs:
            insert("jobs", id=pk, series_version_pk=1, rule_name=f"rule{pk}", model_name="demo",
                   profile="{}", destinations='["pacs"]', state=state,
                   attempts=0 if state == "queued" else 1, reason="", worker=worker,
                   created_at=old, started_at=beat, heartbeat_at=beat, finished_at=None,
                   next_attempt_at=None, seg_path=seg if pk == 4 else "",
                   seg_sop_instance_uid="", timings="{}")  # fmt: skip
        for pk, destination, state in (
            (1, "pacs", "pending"),
            (2, "pacs2", "sending"),  # lease lapsed: its sender died mid-send
            (3, "gone", "dead"),
        ):
            insert("deliveries", id=pk, job_pk=4, destination=destination,
                   resolved_peer="pacs", seg_path=seg, sop_instance_uid=f"2.25.{pk}",
                   state=state, attempts=0 if state == "pending" else 1, next_attempt_at=old,
                   last_error="", created_at=old)  # fmt: skip
    if engine.dialect.name == "postgresql":  # ids given: move the sequences past them
        with engine.begin() as conn:
            for table in TABLES:
                conn.execute(
                    text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))")
                )


def _rows(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    with engine.connect() as conn:
        return {
            table: [tuple(row) for row in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]
            for table in TABLES
        }


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.peers)])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}"
    else:
        yield request.getfixturevalue("fresh_db")


@pytest.mark.peers
@pytest.mark.parametrize("written_at", ["0001", "0002"])
def test_a_node_upgraded_on_an_index_with_work_in_it_resumes_the_work(
    index_url: str, written_at: str, tmp_path: Path
) -> None:
    """An older release's index, full, then the current release starts on it: every row
    kept, the receiving series completes, the queued and the taken-over jobs run, the
    delivery cut off mid-send is sent again, and the administrator's commands read it."""
    data = tmp_path / "data"
    store = FileStore(data / "store", 0, fsync=False)
    _migrate_to(index_url, written_at)
    engine = create_index_engine(index_url)
    _fill_as_an_older_release(engine, store, tmp_path)
    before = _rows(engine)
    engine.dispose()

    index = Index(index_url)  # the node's start: migrates
    assert _version(index_url) == _head()
    after = _rows(index.engine)
    assert {t: len(r) for t, r in after.items()} == {t: len(r) for t, r in before.items()}
    for table in TABLES:
        if table == "deliveries":  # one column more, NULL for rows of before
            assert [row[:-1] for row in after[table]] == before[table]
            assert {row[-1] for row in after[table]} == {None}
        else:
            assert after[table] == before[table], table

    (completed,) = complete_due_series(index, 10.0, on_release=False)
    assert completed.series_version_pk == 2
    claimed = {job.id for job in (claim_job(index, "me:1", 60), claim_job(index, "me:1", 60))
               if job is not None}  # fmt: skip
    assert claimed == {1, 2}

    with storescp_to(tmp_path / "received") as port:
        settings = Settings.model_validate(
            {
                "storage": {"data_dir": str(data), "database_url": index_url},
                "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
            }
        )
        release_interrupted(index)  # a node's start (PostgreSQL: the lapsed lease does it)
        outbox = Outbox(settings, index, store)
        assert outbox.deliver_one() and outbox.deliver_one() and not outbox.deliver_one()
    # Both deliveries carry the same file (one SOP Instance UID): storescp keeps one.
    assert len(list((tmp_path / "received").iterdir())) == 1
    with index.engine.connect() as conn:
        states = dict(conn.execute(text("SELECT id, state FROM deliveries")).all())
    assert states == {1: "delivered", 2: "delivered", 3: "dead"}
    index.dispose()

    config = tmp_path / "config.yaml"
    config.write_text(f"storage:\n  data_dir: {data}\n  database_url: {index_url}\n"
                      "  min_free_disk_mb: 0\n")  # fmt: skip
    for args in (["series", "list"], ["jobs", "list"], ["store", "check", "--grace-s", "0"]):
        run = subprocess.run(
            [str(DICOM_NODE), "-c", str(config), *args],
            capture_output=True, encoding="utf-8", timeout=120, check=False,
            env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert run.returncode == 0, (args, run.stdout, run.stderr)
        assert "Traceback" not in run.stderr, run.stderr


# Runs a node's start with SIGKILL sent to itself right after the statement named.
_KILLED_AT = """
import os, signal, sys
from sqlalchemy import event
from storage.database import create_index_engine, upgrade
engine = create_index_engine(sys.argv[1])
@event.listens_for(engine, "after_cursor_execute")
def kill(_conn, _cursor, statement, *_args):
    if sys.argv[2] in statement:
        os.kill(os.getpid(), signal.SIGKILL)
upgrade(engine)
"""


@pytest.mark.parametrize(
    ("written_at", "killed_after"),
    [("0002", "ALTER TABLE deliveries ADD COLUMN"), (None, "CREATE TABLE jobs")],
)
def test_an_upgrade_killed_mid_migration_is_completed_by_the_next_start(
    tmp_path: Path, written_at: str | None, killed_after: str
) -> None:
    """kill -9 during a migration on SQLite: each CREATE/ALTER had committed on its own, so
    the index kept the new column at 0002 and every later start failed ("duplicate column
    name: sender", given as "index unavailable")."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    if written_at is not None:
        _migrate_to(url, written_at)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AT, url, killed_after],
        cwd=REPO, capture_output=True, encoding="utf-8", timeout=60, check=False,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    Index(url).dispose()  # the next start
    assert _version(url) == _head()


def test_an_index_an_interrupted_upgrade_left_with_the_sender_column_starts(
    tmp_path: Path,
) -> None:
    """An index already left so by an older release (the column added, still at 0002)."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    _migrate_to(url, "0002")
    engine = create_index_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE deliveries ADD COLUMN sender VARCHAR(128)"))
    engine.dispose()
    Index(url).dispose()
    assert _version(url) == _head()


# A node's start whose migration stops after its first ALTER until the file named appears.
_PAUSED_AT_ALTER = """
import pathlib, sys, time
from sqlalchemy import event
from storage.database import create_index_engine, upgrade
engine = create_index_engine(sys.argv[1])
@event.listens_for(engine, "after_cursor_execute")
def pause(_conn, _cursor, statement, *_args):
    if statement.startswith("ALTER"):
        pathlib.Path(sys.argv[2] + ".inside").touch()
        while not pathlib.Path(sys.argv[2]).exists():
            time.sleep(0.02)
upgrade(engine)
"""


def test_sqlite_nodes_starting_at_once_migrate_one_after_the_other(tmp_path: Path) -> None:
    """`serve` and a CLI command started together on an older SQLite index. The second
    found the first's ALTER committed but not its version: it migrated too, and the first
    then failed ("expected to match one row when updating '0002' to '0003'")."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    go = tmp_path / "go"
    _migrate_to(url, "0002")
    first = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_AT_ALTER, url, str(go)],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    start = "import sys; from storage.database import Index; Index(sys.argv[1]).dispose()"
    second = None
    try:
        wait_until(lambda: Path(f"{go}.inside").exists(), timeout_s=30, what="the first ALTER")
        second = subprocess.Popen(
            [sys.executable, "-c", start, url], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.wait(timeout=3)  # it waits for the first's write lock (busy_timeout)
    finally:
        go.touch()
    for process in (first, second):
        assert process is not None
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    assert _version(url) == _head()


@pytest.mark.peers
def test_an_older_release_inserting_without_the_sender_keeps_working(
    fresh_db: str, tmp_path: Path
) -> None:
    """Two nodes sharing the index, one upgraded: the older one's insert of a delivery
    (without the sender column) is accepted, and the upgraded outbox claims it."""
    _migrate_to(fresh_db, "0002")
    engine = create_index_engine(fresh_db)
    _fill_as_an_older_release(engine, FileStore(tmp_path / "store", 0, fsync=False), tmp_path)
    engine.dispose()
    index = Index(fresh_db)
    with index.engine.begin() as conn:  # the older release's own insert, as it wrote it
        conn.execute(
            text(
                "INSERT INTO deliveries (job_pk, destination, resolved_peer, seg_path,"
                " sop_instance_uid, state, attempts, next_attempt_at, last_error, created_at)"
                " VALUES (4, 'later', 'pacs', '', '2.25.9', 'pending', 0, :now, '', :now)"
            ),
            {"now": utcnow() - dt.timedelta(hours=2)},
        )
    from storage.queue import claim_delivery

    claimed = claim_delivery(index, 60, sender="new:1")
    assert claimed is not None and claimed.destination == "later" and claimed.sender == "new:1"
    index.dispose()
