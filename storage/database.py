"""Opening the index: engine, SQLite durability settings, Alembic migrations."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import StorageError
from storage.models import utcnow

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT_S = 10
KEEPALIVE_IDLE_S = 30
# pg_advisory_xact_lock key that serialises migrations of one PostgreSQL index ("dicomnod"
# in ASCII): nodes starting at once would otherwise run the same migration side by side.
MIGRATION_LOCK_KEY = 0x6469636F6D6E6F64
# More than this between a machine's clock and the PostgreSQL server's is logged at start.
CLOCK_SKEW_LIMIT_S = 2.0


def _sqlite_pragmas(fsync: bool) -> Callable[[Any, Any], None]:
    # WAL lets the receiver write while workers read; FULL makes each commit durable
    # before the C-STORE response goes out (NORMAL, with storage.fsync false, survives a
    # killed process but not a power loss); busy_timeout rides over writer contention
    # between the receiver, workers and CLI processes; temporary tables stay in memory.
    synchronous = "FULL" if fsync else "NORMAL"

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA temp_store=MEMORY")
        cursor.close()

    return on_connect


def create_index_engine(url: str, *, fsync: bool = True) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(fsync))
    else:
        # A server that does not answer (network partition, a failed-over address) fails a
        # connection in seconds, not after the kernel's TCP timeouts (~2 minutes to connect,
        # ~15 minutes for a query on a pooled connection, which pool_pre_ping's own query
        # waits out too): a C-STORE gets 0xA700 while the sender still waits for it.
        # tcp_user_timeout bounds unacknowledged data; keepalives notice a dead server
        # while a pooled connection is idle.
        connect_args: dict[str, Any] = {}
        if "postgresql" in url:
            connect_args = {
                "connect_timeout": CONNECT_TIMEOUT_S,
                "tcp_user_timeout": CONNECT_TIMEOUT_S * 1000,
                "keepalives": 1,
                "keepalives_idle": KEEPALIVE_IDLE_S,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            }
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    return engine


_T = TypeVar("_T")


def rolled_back_for_a_conflict(exc: BaseException) -> bool:
    """Whether the server rolled the transaction back for a conflict with another one
    (SQLSTATE class 40: a deadlock, a serialization failure): running it again resolves it."""
    orig = getattr(exc, "orig", None)
    return str(getattr(orig, "sqlstate", None) or "").startswith("40")


def retried_on_conflict(call: Callable[[], _T], tries: int = 3) -> _T:
    """``call()``, run again when the server rolled its transaction back for a conflict
    (a deadlock with a store on PostgreSQL)."""
    for _ in range(tries - 1):
        try:
            return call()
        except OperationalError as exc:
            if not rolled_back_for_a_conflict(exc):
                raise
    return call()


# SQLite's result codes (and their extended forms) for a file damaged or not a database.
_DAMAGED = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def damaged_sqlite_index(exc: BaseException) -> str | None:
    """SQLite's own words when ``exc`` (or one it was raised from) says the index file is
    damaged on disk or is not a database; None otherwise."""
    seen: BaseException | None = exc
    while seen is not None:
        orig = getattr(seen, "orig", None)
        for error in (seen, orig):
            if isinstance(error, sqlite3.DatabaseError) and str(
                getattr(error, "sqlite_errorname", "")
            ).startswith(_DAMAGED):
                return str(error)
        seen = seen.__cause__
    return None


def unavailable_reason(exc: BaseException) -> str | None:
    """Why the index cannot be used, when ``exc`` (or an exception it was raised from)
    says so: a refused or lost connection, a server shutting down, a database file that
    cannot be opened, locked or written, or is damaged, no pooled connection free within
    the pool's wait. None for any other error, including a transaction the server rolled
    back for a conflict (SQLSTATE class 40), which a retry resolves.
    """
    damaged = damaged_sqlite_index(exc)
    if damaged is not None:
        # Every statement fails alike until it is rebuilt: an outage, not a defect.
        return (
            f"{damaged}: the SQLite index file is damaged; stop the node and rebuild the index "
            "(README: Recovering from faults)"
        )
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DBAPIError) and (
            seen.connection_invalidated or isinstance(seen, OperationalError | InterfaceError)
        ):
            if rolled_back_for_a_conflict(seen):
                return None
            lines = str(seen.orig or seen).strip().splitlines()
            return lines[0] if lines else type(seen.orig or seen).__name__
        if isinstance(seen, PoolTimeoutError):  # no pooled connection freed in time
            return str(seen).split(" (Background", 1)[0]
        seen = seen.__cause__
    return None


def _at_head(connection: Any, cfg: AlembicConfig) -> bool:
    current = MigrationContext.configure(connection).get_current_heads()
    return set(current) == set(ScriptDirectory.from_config(cfg).get_heads())


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent, safe at every start, and on
    PostgreSQL safe for several nodes starting at once)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Held until this transaction ends: a second node waits here, then reads
                # the version the first committed and has nothing to do. Without it both
                # created the same tables (UniqueViolation), or both ran 0002 and the
                # second failed to move alembic_version from 0001.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            elif connection.dialect.name == "sqlite":
                if _at_head(connection, cfg):
                    return  # every start and CLI command: no write lock to read a version
                # Python's sqlite3 opens a transaction only before INSERT/UPDATE/DELETE, so
                # each ALTER/CREATE committed on its own: a node killed between a migration's
                # DDL and its alembic_version update could not start again ("duplicate
                # column name"). An explicit BEGIN makes the whole upgrade one transaction;
                # IMMEDIATE takes the write lock first, so processes starting at once migrate
                # one after the other (busy_timeout) and the later one finds it current.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    except SQLAlchemyError as exc:
        reason = unavailable_reason(exc)
        if reason is not None:
            raise StorageError(f"index unavailable at {engine.url!r}: {reason}") from exc
        raise StorageError(f"cannot migrate the index at {engine.url!r}: {exc}") from exc
    except CommandError as exc:
        # Alembic's own: e.g. an index migrated by a newer release than this node's.
        raise StorageError(f"cannot migrate the index at {engine.url!r}: {exc}") from exc


def clock_skew_s(index: Index) -> float | None:
    """How many seconds this machine's UTC clock is ahead of the PostgreSQL server's
    (negative: behind); None on SQLite, whose index one machine's clock writes.

    Machines sharing an index compare timestamps that their own clocks wrote (a series'
    quiet period, a job's heartbeat, a delivery's lease): the server's clock stands for
    theirs. Raises what the query raises when the server does not answer."""
    if index.engine.dialect.name != "postgresql":
        return None
    with index.engine.connect() as connection:
        before = utcnow()
        # clock_timestamp(): the time as the query runs (now() is the transaction's start).
        server: dt.datetime = connection.execute(
            text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")
        ).scalar_one()
        after = utcnow()
    # Against the middle of the round trip: the network delay is not skew.
    return ((before + (after - before) / 2) - server).total_seconds()


def warn_of_clock_skew(index: Index, limit_s: float = CLOCK_SKEW_LIMIT_S) -> float | None:
    """Log a WARNING when this machine's clock and the PostgreSQL server's differ by more
    than ``limit_s``; returns the skew (None on SQLite, or when it could not be measured).
    For a node's start: a failure to measure is logged, never raised."""
    try:
        skew = clock_skew_s(index)
    except SQLAlchemyError as exc:
        logger.warning("could not compare this machine's clock with the index server's: %s", exc)
        return None
    if skew is not None and abs(skew) > limit_s:
        logger.warning(
            "this machine's clock is %.1f s %s the index server's (PostgreSQL at %s): keep "
            "every machine sharing the index synchronised (NTP, chrony); otherwise series "
            "complete before their quiet period, running jobs are taken over and deliveries "
            "sent again while they are still being sent",
            abs(skew),
            "ahead of" if skew > 0 else "behind",
            index.engine.url.render_as_string(hide_password=True),
        )
    return skew


class Index:
    """The opened index: an engine and a session factory, migrated on open."""

    def __init__(self, url: str, *, migrate: bool = True, fsync: bool = True) -> None:
        self.url = url
        self.engine = create_index_engine(url, fsync=fsync)
        if migrate:
            upgrade(self.engine)
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        self._lock_path: Path | None = None
        database = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
            self._lock_path = Path(database + ".writers")

    def session(self) -> Session:
        return self.sessions()

    @contextlib.contextmanager
    def writer_turn(self) -> Iterator[None]:
        """Serialise busy writers across processes (SQLite); a no-op on PostgreSQL.

        SQLite's busy handler polls a locked database with sleeps of up to 100 ms, so
        receiver processes queueing for the write lock mostly slept. A blocking flock
        hands the turn over as soon as the holder is done.
        """
        if self._lock_path is None:
            yield
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def dispose(self) -> None:
        self.engine.dispose()
