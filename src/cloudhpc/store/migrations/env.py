"""Alembic environment of the job store.

`Store.migrate()` builds the Alembic configuration in code and passes an open connection in
`config.attributes["connection"]`, so no alembic.ini is needed at runtime. For developers who
write a new revision, `alembic -x url=sqlite:///dev.db revision --autogenerate -m "..."` with
`script_location` pointing here works too (the URL then comes from `-x url=` or
`sqlalchemy.url`).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from cloudhpc.store.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables for future revisions.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass -x url=... or set sqlalchemy.url")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run Store.migrate()")
run_migrations_online()
