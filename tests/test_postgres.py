"""The index on a real PostgreSQL server: what several machines sharing the work rely on."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peers import NodeProcess, free_port, storescu, wait_until
from sqlalchemy import text

from storage.database import Index
from storage.instances import InstanceRecord, complete_due_series, record_instance
from storage.queue import JobSpec, claim_job, create_job

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


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, server = _pg_bin("initdb"), _pg_bin("postgres")
    prefix = _as_postgres_user()
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    data, sockets = folder / "data", folder / "run"
    sockets.mkdir()
    if prefix:
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
    subprocess.run(
        [*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "node", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    log = open(folder / "postgres.log", "wb")  # noqa: SIM115 - kept open for the server's life
    proc = subprocess.Popen(
        [*prefix, server, "-D", str(data), "-p", str(port), "-k", str(sockets),
         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"postgresql+psycopg://node@127.0.0.1:{port}/postgres"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((folder / "postgres.log").read_text())
        probe = Index(url, migrate=False)
        try:
            probe.engine.connect().close()
        except Exception:
            return False
        finally:
            probe.dispose()  # a pooled connection left open stalls the smart shutdown below
        return True

    wait_until(ready, timeout_s=60, interval_s=0.2, what="PostgreSQL")
    try:
        yield url
    finally:
        # Fast shutdown: a smart one (SIGTERM) waits for every client, and engines the
        # tests dropped keep pooled connections until garbage collection.
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def fresh_db(postgres_url: str) -> Iterator[str]:
    """An empty database per test on the shared server."""
    name = f"t{free_port()}"
    admin = Index(postgres_url, migrate=False)
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"


def _record(index: Index, series: str, i: int, ae: str = "SCU") -> None:
    record_instance(
        index,
        InstanceRecord(
            sop_instance_uid=f"{series}.{i}",
            series_instance_uid=series,
            study_instance_uid="1.2",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"{series}/{i}.dcm",
            size_bytes=1,
            modality="MR",
            calling_ae_title=ae,
        ),
    )


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

    def work(name: str) -> None:
        mine = Index(fresh_db, migrate=False)
        while (job := claim_job(mine, f"host-{name}:1", heartbeat_timeout_s=600)) is not None:
            claimed[name].append(job.id)

    workers = [threading.Thread(target=work, args=(n,)) for n in claimed]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
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
