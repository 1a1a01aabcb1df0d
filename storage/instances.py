"""Indexing received instances and tracking series versions.

The caller (the Storage SCP) extracts the attributes into an :class:`InstanceRecord`;
this module never parses DICOM.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from sqlalchemy import Connection, Table, bindparam, func, insert, select, text, update
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from dicom_node.errors import StorageError
from storage.database import (
    Index,
    retried_on_conflict,
    rolled_back_for_a_conflict,
    unavailable_reason,
)
from storage.models import (
    Base,
    Instance,
    Patient,
    Series,
    SeriesState,
    SeriesVersion,
    Study,
    utcnow,
)

logger = logging.getLogger(__name__)

# Series whose receiving version an InstanceWriter remembers: the latest stored to. A few
# are receiving at any time (max_associations per process); kept for every series ever
# received, they grew each receiver process by ~0.5 KB a series for as long as it ran.
KNOWN_SERIES = 1024


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_description: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    protocol_name: str = ""
    body_part_examined: str = ""
    image_type: str = ""
    frame_of_reference_uid: str = ""
    image_orientation: str = ""
    image_position: str = ""
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int = 1
    expected_count: int | None = None
    calling_ae_title: str = ""
    peer_address: str = ""
    association_id: str = ""


@dataclass(frozen=True)
class Recorded:
    version: int
    replaced: bool
    new_version_opened: bool
    replaced_path: str | None
    version_pk: int = 0
    version_is_new: bool = False  # the version (or its whole series) began in this transaction


def record_instance(index: Index, rec: InstanceRecord) -> Recorded:
    """Insert or replace one instance row and update its series version, in one transaction."""
    return InstanceWriter(index).record([rec])[0]


@dataclass(frozen=True)
class _Current:
    """The receiving version of a series, as last written by this process."""

    series_pk: int
    version_pk: int
    version: int
    calling_ae_title: str
    peer_address: str


# Core tables (typed as such) for the receive path: no ORM unit of work per image.
_series = Base.metadata.tables[Series.__tablename__]
_versions = Base.metadata.tables[SeriesVersion.__tablename__]
_instances = Base.metadata.tables[Instance.__tablename__]

_INSTANCE_COPIED = (
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "image_type",
    "frame_of_reference_uid",
    "image_orientation",
    "image_position",
    "rows",
    "columns",
    "number_of_frames",
    "path",
    "size_bytes",
    "calling_ae_title",
    "peer_address",
    "association_id",
)
_INSTANCE_FIELDS = (*_INSTANCE_COPIED, "series_pk", "version", "received_at")

# Keys, never cut: two long UIDs cut alike would name one image. (PostgreSQL refuses a UID
# longer than its 64-character column; SQLite keeps it.)
UID_KEYS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid")


def _column_limits() -> tuple[tuple[str, int | None], ...]:
    """(record field, characters its narrowest column holds, or None) for each text field
    from the headers (not the UID keys, nor the path the node made)."""
    renamed = {"patient_birth_date": "birth_date", "patient_sex": "sex"}
    lengths: dict[str, int] = {}
    for model in (Patient, Study, Series, Instance):
        for column in Base.metadata.tables[model.__tablename__].columns:
            length = getattr(column.type, "length", None)
            if isinstance(length, int):
                lengths[column.name] = min(lengths.get(column.name, length), length)
    return tuple(
        (f.name, lengths.get(renamed.get(f.name, f.name)))
        for f in fields(InstanceRecord)
        if f.name not in (*UID_KEYS, "path") and f.type in ("str", str)
    )


_LIMITS = _column_limits()


def _fitted(rec: InstanceRecord) -> InstanceRecord:
    """``rec`` with each text cut to what its column holds, and without NUL characters.

    PostgreSQL refuses a longer value (SQLite keeps it), and a NUL anywhere in text (some
    devices leave one inside a value, with what followed it in their buffer): a birth date
    sent as 1970-01-01 or such a description would fail the store on every retry. The file
    keeps every byte as sent.
    """
    over: dict[str, Any] = {}
    for name, limit in _LIMITS:
        value = getattr(rec, name)
        fitted = value.replace("\x00", "") if "\x00" in value else value
        if limit is not None and len(fitted) > limit:
            fitted = fitted[:limit]
        if fitted is not value:
            over[name] = fitted
    return replace(rec, **over) if over else rec


# Statements built once: building SQLAlchemy expressions per image cost more than SQLite.
_TOUCH_VERSION = (
    update(_versions)
    .where(
        _versions.c.id == bindparam("b_version_pk"),
        # The row remembered, not one that took its key: SQLite gives the keys of deleted
        # rows again, and another process may have received the series again after a prune.
        _versions.c.series_pk == bindparam("b_series_pk"),
        _versions.c.version == bindparam("b_version"),
        _versions.c.state == SeriesState.RECEIVING,
        select(_series.c.id)
        .where(
            _series.c.id == _versions.c.series_pk,
            _series.c.series_instance_uid == bindparam("b_series_uid"),
        )
        .exists(),
    )
    .values(last_received_at=bindparam("b_now"))
)
_PRIOR_INSTANCES = (
    select(
        _instances.c.sop_instance_uid,
        _instances.c.series_pk,
        _instances.c.version,
        _instances.c.path,
    )
    .where(_instances.c.sop_instance_uid.in_(bindparam("b_sops", expanding=True)))
    .with_for_update()
)
_INSERT_INSTANCE = insert(_instances)
_UPDATE_INSTANCE = (
    update(_instances)
    .where(_instances.c.sop_instance_uid == bindparam("b_sop"))
    .values({name: bindparam(name) for name in _INSTANCE_FIELDS})
)
_COUNT_VERSION = (
    update(_versions)
    .where(_versions.c.id == bindparam("b_version_pk"))
    .values(
        instance_count=_versions.c.instance_count + bindparam("b_delta"),
        last_received_at=bindparam("b_now"),
        last_association_id=bindparam("b_association_id"),
        association_released=False,
        expected_count=func.coalesce(bindparam("b_expected"), _versions.c.expected_count),
    )
)
_MOVED_AWAY = (
    update(_versions)
    .where(
        _versions.c.series_pk == bindparam("b_series_pk"),
        _versions.c.version == bindparam("b_version"),
    )
    .values(instance_count=_versions.c.instance_count + bindparam("b_delta"))
)


class CommitOutcomeUnknown(StorageError):
    """The index failed during COMMIT itself (a connection to PostgreSQL lost as it
    committed): the rows may have committed. A store's file then stays unless a look-up
    finds that no row names it."""


class InstanceWriter:
    """Records received instances, several in one transaction when they arrive together.

    Remembers, per process, the receiving version of the ``KNOWN_SERIES`` series stored to
    last: an image of a known series costs a guarded UPDATE of that version row (still
    receiving, still this series), the instance lookup, its INSERT or UPDATE and the count
    increment, instead of five ORM queries and a COUNT(*). Anything the guard does not
    confirm (completed version, pruned series, a version opened by another process) falls
    back to reading the rows, as does a series stored to longer ago.
    Callers serialise calls (the group committer does).
    """

    def __init__(self, index: Index) -> None:
        self.index = index
        self._known: OrderedDict[str, _Current] = OrderedDict()

    def record(
        self,
        records: Sequence[InstanceRecord],
        before_commit: Callable[[], object] | None = None,
    ) -> list[Recorded]:
        """Record ``records`` in one transaction; retried when a concurrent writer won a race.

        ``before_commit`` runs after the statements, before COMMIT; if it raises, nothing
        is recorded (the receiver waits there for its files to be durable).
        """
        records = [_fitted(rec) for rec in records]
        last_exc: Exception | None = None
        for _ in range(5):
            staged: dict[str, _Current] = {}
            committing = False
            try:
                with self.index.writer_turn(), self.index.engine.begin() as conn:
                    results = self._record(conn, records, staged)
                    if before_commit is not None:
                        before_commit()
                    committing = True  # leaving the block commits
            except IntegrityError as exc:  # lost a race creating the same row
                last_exc = exc
                continue
            except OperationalError as exc:
                if rolled_back_for_a_conflict(exc):
                    # A deadlock with another receiver or the completion check (PostgreSQL):
                    # the server chose this transaction to roll back; the next try passes.
                    last_exc = exc
                    continue
                if committing:
                    raise CommitOutcomeUnknown(
                        f"index unavailable as it committed: {exc.orig}"
                    ) from exc
                raise StorageError(f"index unavailable: {exc.orig}") from exc
            except PoolTimeoutError as exc:
                # Every pooled connection busy for the pool's whole wait (30 s).
                raise StorageError(f"index unavailable: {unavailable_reason(exc)}") from exc
            except DatabaseError as exc:  # a SQLite file damaged on disk, among others
                reason = unavailable_reason(exc)
                if reason is None:
                    raise
                raise StorageError(f"index unavailable: {reason}") from exc
            # Only committed rows are remembered: a rolled-back primary key can be reused.
            self._remember(staged)
            return results
        raise StorageError(f"index write kept conflicting: {last_exc}")

    def _remember(self, staged: dict[str, _Current]) -> None:
        for uid, current in staged.items():
            self._known[uid] = current
            self._known.move_to_end(uid)
        while len(self._known) > KNOWN_SERIES:
            self._known.popitem(last=False)  # the series stored to longest ago

    def _record(
        self, conn: Connection, records: Sequence[InstanceRecord], staged: dict[str, _Current]
    ) -> list[Recorded]:
        lock_images(conn, [r.sop_instance_uid for r in records])
        now = utcnow()
        by_series: dict[str, list[InstanceRecord]] = {}
        for rec in records:
            by_series.setdefault(rec.series_instance_uid, []).append(rec)
        current: dict[str, _Current] = {}
        opened: set[str] = set()
        new: set[str] = set()
        # Sorted: concurrent writers lock version rows in the same order (no deadlock).
        for uid in sorted(by_series):
            group = by_series[uid]
            cur, began = self._current_version(conn, group[0], now, staged)
            cur = self._note_sender(conn, cur, group[-1])
            staged[uid] = current[uid] = cur
            if began == "version":
                opened.add(uid)
            if began:
                new.add(uid)

        sops = sorted({r.sop_instance_uid for r in records})
        prior = {
            row.sop_instance_uid: (row.series_pk, row.version, row.path)
            for row in conn.execute(_PRIOR_INSTANCES, {"b_sops": sops})
        }
        inserts: list[dict[str, object]] = []
        updates: list[dict[str, object]] = []
        deltas: dict[tuple[int, int], int] = {}
        results: list[Recorded] = []
        for rec in records:
            cur = current[rec.series_instance_uid]
            fields = _instance_fields(rec, cur, now)
            key = (cur.series_pk, cur.version)
            before = prior.get(rec.sop_instance_uid)
            replaced_path: str | None = None
            if before is None:
                inserts.append(fields)
                deltas[key] = deltas.get(key, 0) + 1
            else:
                old_key = (before[0], before[1])
                if old_key != key:  # moved to another version (or series): both counts change
                    deltas[old_key] = deltas.get(old_key, 0) - 1
                    deltas[key] = deltas.get(key, 0) + 1
                if before[2] != rec.path:
                    replaced_path = before[2]
                updates.append({"b_sop": rec.sop_instance_uid, **fields})
            prior[rec.sop_instance_uid] = (cur.series_pk, cur.version, rec.path)
            first_opened = rec.series_instance_uid in opened
            opened.discard(rec.series_instance_uid)
            results.append(
                Recorded(
                    version=cur.version,
                    replaced=before is not None,
                    new_version_opened=first_opened,
                    replaced_path=replaced_path,
                    version_pk=cur.version_pk,
                    version_is_new=rec.series_instance_uid in new,
                )
            )
        if inserts:
            conn.execute(_INSERT_INSTANCE, inserts)
        if updates:
            conn.execute(_UPDATE_INSTANCE, updates)
        self._update_versions(conn, by_series, current, deltas, now)
        return results

    def _current_version(
        self,
        conn: Connection,
        rec: InstanceRecord,
        now: dt.datetime,
        staged: dict[str, _Current],
    ) -> tuple[_Current, str]:
        """The receiving version of ``rec``'s series, opened or created when needed, and
        what began: "series", "version" or "" (an existing receiving version).

        Its row is updated first: that takes the write lock (SQLite) or the row lock
        (PostgreSQL), so completion cannot close the version under this transaction.
        """
        uid = rec.series_instance_uid
        known = staged.get(uid) or self._known.get(uid)
        if known is not None and self._touch(conn, known, uid, now):
            return known, ""
        row = conn.execute(
            select(
                _series.c.id,
                _series.c.current_version,
                _series.c.calling_ae_title,
                _series.c.peer_address,
            ).where(_series.c.series_instance_uid == uid)
        ).first()
        if row is None:
            return self._create_series(conn, rec), "series"
        version_pk = conn.execute(
            select(_versions.c.id).where(
                _versions.c.series_pk == row.id, _versions.c.version == row.current_version
            )
        ).scalar()
        cur = _Current(
            row.id, version_pk or 0, row.current_version, row.calling_ae_title, row.peer_address
        )
        if version_pk is not None and self._touch(conn, cur, uid, now):
            return cur, ""
        # The current version is complete: this instance opens the next one.
        number = row.current_version + 1
        conn.execute(update(_series).where(_series.c.id == row.id).values(current_version=number))
        new_pk = _insert_pk(conn, _versions, series_pk=row.id, version=number)
        return _Current(row.id, new_pk, number, row.calling_ae_title, row.peer_address), "version"

    @staticmethod
    def _touch(conn: Connection, cur: _Current, series_uid: str, now: dt.datetime) -> bool:
        """Update the version's arrival time if it is still receiving and still this series'."""
        result = conn.execute(
            _TOUCH_VERSION,
            {
                "b_version_pk": cur.version_pk,
                "b_series_pk": cur.series_pk,
                "b_version": cur.version,
                "b_series_uid": series_uid,
                "b_now": now,
            },
        )
        return result.rowcount == 1

    @staticmethod
    def _create_series(conn: Connection, rec: InstanceRecord) -> _Current:
        study_pk = conn.execute(
            select(Study.id).where(Study.study_instance_uid == rec.study_instance_uid)
        ).scalar()
        if study_pk is None:
            patient_pk = conn.execute(
                select(Patient.id).where(
                    Patient.patient_id == rec.patient_id, Patient.patient_name == rec.patient_name
                )
            ).scalar()
            if patient_pk is None:
                patient_pk = _insert_pk(
                    conn,
                    Base.metadata.tables[Patient.__tablename__],
                    patient_id=rec.patient_id,
                    patient_name=rec.patient_name,
                    birth_date=rec.patient_birth_date,
                    sex=rec.patient_sex,
                )
            study_pk = _insert_pk(
                conn,
                Base.metadata.tables[Study.__tablename__],
                study_instance_uid=rec.study_instance_uid,
                patient_pk=patient_pk,
                study_date=rec.study_date,
                study_time=rec.study_time,
                accession_number=rec.accession_number,
                study_description=rec.study_description,
            )
        series_pk = _insert_pk(
            conn,
            _series,
            series_instance_uid=rec.series_instance_uid,
            study_pk=study_pk,
            modality=rec.modality,
            series_number=rec.series_number,
            series_description=rec.series_description,
            protocol_name=rec.protocol_name,
            body_part_examined=rec.body_part_examined,
            image_type=rec.image_type,
            frame_of_reference_uid=rec.frame_of_reference_uid,
            calling_ae_title=rec.calling_ae_title,
            peer_address=rec.peer_address,
            current_version=1,
        )
        version_pk = _insert_pk(conn, _versions, series_pk=series_pk, version=1)
        return _Current(series_pk, version_pk, 1, rec.calling_ae_title, rec.peer_address)

    @staticmethod
    def _note_sender(conn: Connection, cur: _Current, rec: InstanceRecord) -> _Current:
        """The latest sender is where results go back to; written only when it changes."""
        if not rec.calling_ae_title or (cur.calling_ae_title, cur.peer_address) == (
            rec.calling_ae_title,
            rec.peer_address,
        ):
            return cur
        conn.execute(
            update(_series)
            .where(_series.c.id == cur.series_pk)
            .values(calling_ae_title=rec.calling_ae_title, peer_address=rec.peer_address)
        )
        return replace(cur, calling_ae_title=rec.calling_ae_title, peer_address=rec.peer_address)

    @staticmethod
    def _update_versions(
        conn: Connection,
        by_series: dict[str, list[InstanceRecord]],
        current: dict[str, _Current],
        deltas: dict[tuple[int, int], int],
        now: dt.datetime,
    ) -> None:
        for uid, group in by_series.items():
            cur = current[uid]
            expected = [r.expected_count for r in group if r.expected_count]
            conn.execute(
                _COUNT_VERSION,
                {
                    "b_version_pk": cur.version_pk,
                    "b_delta": deltas.pop((cur.series_pk, cur.version), 0),
                    "b_now": now,
                    "b_association_id": group[-1].association_id,
                    "b_expected": expected[-1] if expected else None,
                },
            )
        for (series_pk, version), delta in deltas.items():
            if delta:  # instances that moved away from an older version or another series
                conn.execute(
                    _MOVED_AWAY, {"b_series_pk": series_pk, "b_version": version, "b_delta": delta}
                )


def _insert_pk(conn: Connection, table: Table, **values: object) -> int:
    key = conn.execute(insert(table).values(**values)).inserted_primary_key
    if key is None:
        raise StorageError(f"the index returned no key for the new {table.name} row")
    return int(key[0])


def _instance_fields(rec: InstanceRecord, cur: _Current, now: dt.datetime) -> dict[str, object]:
    fields: dict[str, object] = {name: getattr(rec, name) for name in _INSTANCE_COPIED}
    fields.update(
        sop_instance_uid=rec.sop_instance_uid,
        series_pk=cur.series_pk,
        version=cur.version,
        received_at=now,
    )
    return fields


def refresh_instance_rows(index: Index, records: Sequence[InstanceRecord]) -> int:
    """Update the rows of images whose file was replaced by a complete copy of the same
    image (a re-send whose own row update failed) from that file: size, transfer syntax,
    geometry. The sender's address and association stay those of the row."""
    kept = {"path", "peer_address", "association_id"}
    refreshed = 0
    with index.session() as session, session.begin():
        for rec in records:
            values = {name: getattr(rec, name) for name in _INSTANCE_COPIED if name not in kept}
            result = session.execute(
                update(_instances)
                .where(
                    _instances.c.path == rec.path,
                    _instances.c.sop_instance_uid == rec.sop_instance_uid,
                )
                .values(**values)
            )
            refreshed += result.rowcount  # type: ignore[attr-defined]
    return refreshed


# pg_advisory_xact_lock(class, key): the class keeps these apart from other advisory locks.
_IMAGE_LOCK_CLASS = 0x64636D69  # "dcmi"


def lock_images(conn: Connection, sop_instance_uids: Sequence[str]) -> None:
    """PostgreSQL: hold each image's lock until the transaction ends, so that a refused
    store's clean-up (``row_held``) waits for a store of the same image in flight, even of
    a new image, which has no row to lock yet. Taken in one order by every transaction (no
    deadlock). A no-op on SQLite, where the writer turn serialises those already."""
    if conn.dialect.name != "postgresql":
        return
    for key in sorted({_image_key(uid) for uid in sop_instance_uids}):
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:class_id, :key)"),
            {"class_id": _IMAGE_LOCK_CLASS, "key": key},
        )


def _image_key(sop_instance_uid: str) -> int:
    # Stable across processes and machines (Python's hash() is not); a collision only
    # makes two images wait for each other.
    digest = hashlib.blake2b(sop_instance_uid.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.contextmanager
def row_held(index: Index, sop_instance_uid: str) -> Iterator[str | None]:
    """The file the committed row of this SOP Instance UID names (None without a row), with
    the row held until the block ends: no store of the image commits meanwhile, and one
    waiting for it checks its file only after (``WrittenFile.check_still_there``).
    StorageError when the index cannot be read.

    PostgreSQL: the image's lock (``lock_images``), which a store holds from its first
    statement to its commit, check included. SQLite: the writer turn, inside which every
    store's transaction runs.
    """
    try:
        with index.writer_turn(), index.engine.begin() as conn:
            lock_images(conn, [sop_instance_uid])
            yield conn.execute(
                select(_instances.c.path)
                .where(_instances.c.sop_instance_uid == sop_instance_uid)
                .with_for_update()
            ).scalar_one_or_none()
    except SQLAlchemyError as exc:  # the pool's timeout too
        raise StorageError(f"index unavailable: {unavailable_reason(exc) or exc}") from exc


def mark_association_released(index: Index, association_id: str) -> None:
    def mark() -> None:
        with index.session() as session, session.begin():
            session.execute(
                update(SeriesVersion)
                .where(
                    SeriesVersion.last_association_id == association_id,
                    SeriesVersion.state == SeriesState.RECEIVING,
                )
                .values(association_released=True)
            )

    retried_on_conflict(mark)


@dataclass(frozen=True)
class CompletedSeries:
    series_instance_uid: str
    study_instance_uid: str
    version: int
    instance_count: int
    reason: str
    series_version_pk: int
    expected_count: int | None = None  # what the headers announced, where they did

    @property
    def short(self) -> bool:
        """Fewer images than announced: the sender stopped early, or is still to resume."""
        return fewer_than_announced(self.instance_count, self.expected_count)


def up_to_version(series_pk: int, version: int) -> list[Any]:
    """WHERE clauses: the images of series version ``version`` as its job reads them, every
    image of the series so far (what the routing rules count as well)."""
    return [Instance.series_pk == series_pk, Instance.version <= version]


def fewer_than_announced(instance_count: int, expected_count: int | None) -> bool:
    return bool(expected_count) and instance_count < (expected_count or 0)


def complete_due_series(
    index: Index, quiet_period_s: float, *, on_release: bool
) -> list[CompletedSeries]:
    """Mark receiving versions complete when quiet long enough, or released with the count met."""
    return retried_on_conflict(lambda: _complete_due_series(index, quiet_period_s, on_release))


def _complete_due_series(
    index: Index, quiet_period_s: float, on_release: bool
) -> list[CompletedSeries]:
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=quiet_period_s)
    done: list[CompletedSeries] = []
    with index.session() as session, session.begin():
        rows = session.execute(
            select(SeriesVersion, Series, Study)
            .join(Series, SeriesVersion.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(SeriesVersion.state == SeriesState.RECEIVING)
        ).all()
        for version, series, study in rows:
            reason = ""
            if version.last_received_at <= cutoff:
                reason = f"quiet for {quiet_period_s:g} s"
                if fewer_than_announced(version.instance_count, version.expected_count):
                    reason += (
                        f", {version.instance_count} of {version.expected_count} announced images"
                    )
            elif (
                on_release
                and version.association_released
                and version.expected_count
                and version.instance_count >= version.expected_count
            ):
                reason = (
                    "association released with "
                    f"{version.instance_count}/{version.expected_count} images"
                )
            if not reason:
                continue
            # Conditional on what was read: an image committed since (SQLite reads outside
            # the write transaction; PostgreSQL reads without locking) makes the facts
            # stale, and the version waits for the next check.
            closed = session.execute(
                update(SeriesVersion)
                .where(
                    SeriesVersion.id == version.id,
                    SeriesVersion.state == SeriesState.RECEIVING,
                    SeriesVersion.instance_count == version.instance_count,
                    SeriesVersion.last_received_at == version.last_received_at,
                )
                .values(state=SeriesState.COMPLETE, completed_at=now, completion_reason=reason)
                .execution_options(synchronize_session=False)
            )
            if closed.rowcount != 1:  # type: ignore[attr-defined]
                continue
            done.append(
                CompletedSeries(
                    series_instance_uid=series.series_instance_uid,
                    study_instance_uid=study.study_instance_uid,
                    version=version.version,
                    instance_count=version.instance_count,
                    reason=reason,
                    series_version_pk=version.id,
                    expected_count=version.expected_count,
                )
            )
    return done
