"""widen UID columns to 255 characters

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

DICOM limits a UID to 64 characters, but some devices send longer ones. PostgreSQL
enforced the 64 of the first schema and refused such images with 0xA700 (out of
resources), which a sender retries forever; SQLite never enforced it. Both now hold 255
(numbers, not storage.models' constant: a migration stays as it was written).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UID_COLUMNS = (
    ("studies", "study_instance_uid"),
    ("series", "series_instance_uid"),
    ("series", "frame_of_reference_uid"),
    ("instances", "sop_instance_uid"),
    ("instances", "frame_of_reference_uid"),
)


def _alter(length: int, was: int) -> None:
    # SQLite never enforces a VARCHAR length, and changing a declared type there means
    # copying the whole table (minutes for a large instances table at a node's start).
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in UID_COLUMNS:
        op.alter_column(
            table,
            column,
            type_=sa.String(length=length),
            existing_type=sa.String(length=was),
            existing_nullable=False,
        )


def upgrade() -> None:
    _alter(255, 64)


def downgrade() -> None:
    _alter(64, 255)
