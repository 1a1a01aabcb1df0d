"""Alembic environment: runs on the connection handed over by storage.database.upgrade."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from storage.models import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")

if connection is None:
    # Plain `alembic` CLI use: take the URL from the -x db_url=... argument.
    url = context.get_x_argument(as_dictionary=True).get("db_url", "sqlite:///var/index.sqlite")
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
