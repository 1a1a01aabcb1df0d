"""delivery sender; 64-bit instance sizes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

deliveries.sender: the process that claimed a delivery, so that a node starting takes back
only the sends it was making itself when it stopped, not those another machine sharing
the index is making now (it sent them twice, at the same time).

instances.size_bytes: BIGINT. PostgreSQL's INTEGER refused a file over 2 GiB (a large
multi-frame or whole-slide image) with "integer out of range". SQLite stores any integer
in 8 bytes whatever the declared type, and changing a declared type there means copying
the whole table (minutes for a large instances table at a node's start): it is left as it
is, as 0002 leaves its UID columns. PostgreSQL rewrites the table once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: an ALTER TABLE ... ADD COLUMN on both databases,
    # no table copy. Deliveries claimed before it are NULL (no process known).
    # An SQLite index whose upgrade was killed after this ALTER committed on its own (before
    # storage.database.upgrade ran it in one transaction) has the column and is at 0002:
    # adding it again failed every start with "duplicate column name".
    columns = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("deliveries")}
    if "sender" not in columns:
        op.add_column("deliveries", sa.Column("sender", sa.String(length=128), nullable=True))
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column(
            "instances",
            "size_bytes",
            type_=sa.BigInteger(),
            existing_type=sa.Integer(),
            existing_nullable=False,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column(
            "instances",
            "size_bytes",
            type_=sa.Integer(),
            existing_type=sa.BigInteger(),
            existing_nullable=False,
        )
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.drop_column("sender")
