"""Indexing received instances and tracking series versions.

The caller (the Storage SCP) extracts the attributes into an :class:`InstanceRecord`;
this module never parses DICOM.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dicom_node.errors import StorageError
from storage.database import Index
from storage.models import (
    Instance,
    Patient,
    Series,
    SeriesState,
    SeriesVersion,
    Study,
    utcnow,
)

logger = logging.getLogger(__name__)


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


def record_instance(index: Index, rec: InstanceRecord) -> Recorded:
    """Insert or replace the instance row and update its series version, in one transaction.

    Retried when a concurrent receiver created the same patient/study/series first.
    """
    last_exc: Exception | None = None
    for _ in range(5):
        try:
            with index.session() as session, session.begin():
                return _record(session, rec)
        except IntegrityError as exc:  # lost a race creating the same parent row
            last_exc = exc
        except OperationalError as exc:
            raise StorageError(f"index unavailable: {exc.orig}") from exc
    raise StorageError(f"index write kept conflicting: {last_exc}")


def _get_or_create_series(session: Session, rec: InstanceRecord) -> Series:
    series = session.scalar(
        select(Series).where(Series.series_instance_uid == rec.series_instance_uid)
    )
    if series is not None:
        return series
    study = session.scalar(select(Study).where(Study.study_instance_uid == rec.study_instance_uid))
    if study is None:
        patient = session.scalar(
            select(Patient).where(
                Patient.patient_id == rec.patient_id, Patient.patient_name == rec.patient_name
            )
        )
        if patient is None:
            patient = Patient(
                patient_id=rec.patient_id,
                patient_name=rec.patient_name,
                birth_date=rec.patient_birth_date,
                sex=rec.patient_sex,
            )
            session.add(patient)
            session.flush()
        study = Study(
            study_instance_uid=rec.study_instance_uid,
            patient_pk=patient.id,
            study_date=rec.study_date,
            study_time=rec.study_time,
            accession_number=rec.accession_number,
            study_description=rec.study_description,
        )
        session.add(study)
        session.flush()
    series = Series(
        series_instance_uid=rec.series_instance_uid,
        study_pk=study.id,
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
    session.add(series)
    session.flush()
    session.add(SeriesVersion(series_pk=series.id, version=1))
    session.flush()
    return series


def _record(session: Session, rec: InstanceRecord) -> Recorded:
    now = utcnow()
    series = _get_or_create_series(session, rec)
    version = session.scalar(
        select(SeriesVersion).where(
            SeriesVersion.series_pk == series.id, SeriesVersion.version == series.current_version
        )
    )
    assert version is not None  # created with the series
    opened = False
    if version.state == SeriesState.COMPLETE:
        series.current_version += 1
        version = SeriesVersion(series_pk=series.id, version=series.current_version)
        session.add(version)
        session.flush()
        opened = True
    # The latest sender is where results go back to.
    if rec.calling_ae_title:
        series.calling_ae_title = rec.calling_ae_title
        series.peer_address = rec.peer_address

    existing = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid)
    )
    replaced_path: str | None = None
    fields = {
        "series_pk": series.id,
        "version": version.version,
        "sop_class_uid": rec.sop_class_uid,
        "transfer_syntax_uid": rec.transfer_syntax_uid,
        "instance_number": rec.instance_number,
        "image_type": rec.image_type,
        "frame_of_reference_uid": rec.frame_of_reference_uid,
        "image_orientation": rec.image_orientation,
        "image_position": rec.image_position,
        "rows": rec.rows,
        "columns": rec.columns,
        "number_of_frames": rec.number_of_frames,
        "path": rec.path,
        "size_bytes": rec.size_bytes,
        "calling_ae_title": rec.calling_ae_title,
        "peer_address": rec.peer_address,
        "association_id": rec.association_id,
        "received_at": now,
    }
    if existing is None:
        session.add(Instance(sop_instance_uid=rec.sop_instance_uid, **fields))
    else:
        if existing.path != rec.path:
            replaced_path = existing.path
        for key, value in fields.items():
            setattr(existing, key, value)
    session.flush()
    version.instance_count = (
        session.scalar(
            select(func.count(Instance.id)).where(
                Instance.series_pk == series.id, Instance.version == version.version
            )
        )
        or 0
    )
    version.last_received_at = now
    version.last_association_id = rec.association_id
    version.association_released = False
    if rec.expected_count:
        version.expected_count = rec.expected_count
    return Recorded(
        version=version.version,
        replaced=existing is not None,
        new_version_opened=opened,
        replaced_path=replaced_path,
    )


def mark_association_released(index: Index, association_id: str) -> None:
    with index.session() as session, session.begin():
        session.execute(
            update(SeriesVersion)
            .where(
                SeriesVersion.last_association_id == association_id,
                SeriesVersion.state == SeriesState.RECEIVING,
            )
            .values(association_released=True)
        )


@dataclass(frozen=True)
class CompletedSeries:
    series_instance_uid: str
    study_instance_uid: str
    version: int
    instance_count: int
    reason: str
    series_version_pk: int


def complete_due_series(
    index: Index, quiet_period_s: float, *, on_release: bool
) -> list[CompletedSeries]:
    """Mark receiving versions complete when quiet long enough, or released with the count met."""
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
            version.state = SeriesState.COMPLETE
            version.completed_at = now
            version.completion_reason = reason
            done.append(
                CompletedSeries(
                    series_instance_uid=series.series_instance_uid,
                    study_instance_uid=study.study_instance_uid,
                    version=version.version,
                    instance_count=version.instance_count,
                    reason=reason,
                    series_version_pk=version.id,
                )
            )
    return done
