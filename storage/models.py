"""The storage index: patients, studies, series (and their versions), instances, jobs, deliveries.

Rows only; no networking and no DICOM parsing here. Timestamps are UTC.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


# DICOM allows 64 characters in a UID; some devices send longer ones, which are stored and
# indexed up to this length (migration 0002) and refused above it.
UID_LENGTH = 255


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY_WAIT = "retry_wait"
    CANCELLED = "cancelled"  # by the operator: finished, not a failure


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"
    CANCELLED = "cancelled"  # by the operator: never sent, not a failure


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings (no native enum type, no CHECK constraint) so SQLite and
    # PostgreSQL read the same, and a new state needs no migration.
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    __table_args__ = (UniqueConstraint("patient_id", "patient_name", name="uq_patient_identity"),)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(32), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str] = mapped_column(String(256), default="")
    patient: Mapped[Patient] = relationship()


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(256), default="")
    protocol_name: Mapped[str] = mapped_column(String(256), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    image_type: Mapped[str] = mapped_column(String(256), default="")  # backslash-joined values
    frame_of_reference_uid: Mapped[str] = mapped_column(String(UID_LENGTH), default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")  # who sent it first
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    current_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    study: Mapped[Study] = relationship()
    versions: Mapped[list[SeriesVersion]] = relationship(
        back_populates="series", order_by="SeriesVersion.version"
    )


class SeriesVersion(Base):
    """One arrival of a series: complete after a quiet period; later instances open the next one."""

    __tablename__ = "series_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.RECEIVING)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    expected_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    last_association_id: Mapped[str] = mapped_column(String(64), default="")
    association_released: Mapped[bool] = mapped_column(default=False)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    completion_reason: Mapped[str] = mapped_column(String(64), default="")
    routed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    series: Mapped[Series] = relationship(back_populates="versions")
    __table_args__ = (UniqueConstraint("series_pk", "version", name="uq_series_version"),)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_type: Mapped[str] = mapped_column(String(256), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(String(UID_LENGTH), default="")
    image_orientation: Mapped[str] = mapped_column(String(256), default="")  # backslash-joined
    image_position: Mapped[str] = mapped_column(String(256), default="")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    path: Mapped[str] = mapped_column(Text)  # relative to the store root
    # 64-bit: a large multi-frame or whole-slide file passes 2 GiB (migration 0003).
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    association_id: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    series: Mapped[Series] = relationship()


class Job(Base):
    """One segmentation of one series version by one routing rule."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_version_pk: Mapped[int] = mapped_column(ForeignKey("series_versions.id"), index=True)
    rule_name: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(128))
    profile: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    worker: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    seg_path: Mapped[str] = mapped_column(Text, default="")
    seg_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    series_version: Mapped[SeriesVersion] = relationship()
    __table_args__ = (UniqueConstraint("series_version_pk", "rule_name", name="uq_job_rule"),)


class Delivery(Base):
    """One SEG to one destination; the outbox sends it until delivered or dead."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    resolved_peer: Mapped[str] = mapped_column(String(128), default="")
    seg_path: Mapped[str] = mapped_column(Text, default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Which process claimed it last (dicom_node.worker.worker_id; migration 0003): at its
    # start a node takes back only its own interrupted sends, never another machine's.
    sender: Mapped[str | None] = mapped_column(String(128), nullable=True)
    job: Mapped[Job] = relationship()
    __table_args__ = (UniqueConstraint("job_pk", "destination", name="uq_delivery_dest"),)
