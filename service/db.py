"""Engine and session factory for Postgres (production) or SQLite (embedded mode)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnDefault, Engine, Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from service.models import Base
from service.settings import get_settings


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while an in-process job writes; FKs are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
    )


@lru_cache
def get_engine(url: str | None = None) -> Engine:
    settings = get_settings()
    return make_engine(
        url or settings.database_url,
        pool_size=settings.database.pool_size,
        echo=settings.database.echo,
    )


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


def iter_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session:
        yield session


# From this many rows on, Postgres inserts go through COPY: one multi-row VALUES statement is
# compiled by SQLAlchemy parameter by parameter (~2,000 rows/s measured for example rows) and
# cannot carry more than 65,535 parameters at all; COPY into a staging table then one
# INSERT ... SELECT ... ON CONFLICT DO NOTHING is >15x faster (bench/export.py measures it).
COPY_MIN_ROWS = 64


def insert_ignore(
    session: Session, model: type[Base], rows: Sequence[dict[str, Any]], conflict: Sequence[str]
) -> int:
    """INSERT … ON CONFLICT DO NOTHING on the natural key; returns how many rows were new.

    The idempotent write that makes a redelivered task harmless (both dialects support it).
    Rows are sent as one executemany (SQLAlchemy batches it into multi-row INSERTs itself):
    one statement compiled once, instead of a VALUES list whose compilation costs more CPU
    than the insert (profiled: ~40% of a generation worker's time before).
    """
    if not rows:
        return 0
    table = model.__table__
    assert isinstance(table, Table)
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql" and len(rows) >= COPY_MIN_ROWS:
        return _copy_insert_ignore(session, table, rows, conflict)
    stmt: Any
    if dialect == "postgresql":
        stmt = pg_insert(table).on_conflict_do_nothing(index_elements=conflict)
    elif dialect == "sqlite":
        stmt = sqlite_insert(table).on_conflict_do_nothing(index_elements=conflict)
    else:  # pragma: no cover - only the two supported dialects are configured
        raise RuntimeError(f"unsupported database dialect {dialect}")
    by_keys: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:  # executemany wants the same keys in every row
        by_keys.setdefault(frozenset(row), []).append(row)
    added = 0
    for group in by_keys.values():
        # SQLAlchemy keeps an INSERT's rowcount only when asked to (it is -1 otherwise).
        result = session.execute(stmt, group, execution_options={"preserve_rowcount": True})
        added += max(0, int(getattr(result, "rowcount", 0) or 0))
    return added


def _copy_insert_ignore(
    session: Session, table: Table, rows: Sequence[dict[str, Any]], conflict: Sequence[str]
) -> int:
    """`insert_ignore` on Postgres through COPY into a temporary staging table (private to the
    connection, emptied at commit) and one INSERT … SELECT … ON CONFLICT DO NOTHING. Values
    pass through the columns' own SQLAlchemy bind processing, so they are stored exactly as
    the VALUES path stores them (a JSON None as JSON null, enums as their values)."""
    # Python-side column defaults (uuid4 ids, 0 counters, {} for JSON) are SQLAlchemy's to
    # apply, as the VALUES path does: COPY would leave them NULL.
    defaults = {
        column.name: column.default
        for column in table.columns
        if isinstance(column.default, ColumnDefault)
        and (column.default.is_scalar or column.default.is_callable)
    }
    names = list(dict.fromkeys([*(name for row in rows for name in row), *defaults]))
    dialect = session.get_bind().dialect
    columns_with = [
        (name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect), defaults.get(name))
        for name in names
    ]

    def value(row: dict[str, Any], name: str, default: ColumnDefault | None) -> Any:
        if name in row or default is None:
            return row.get(name)
        return default.arg if default.is_scalar else default.arg(None)

    stage = f"_stage_{table.name}"
    columns = ", ".join(f'"{name}"' for name in names)
    session.flush()
    cursor = session.connection().connection.cursor()
    try:
        cursor.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" (LIKE "{table.name}" INCLUDING DEFAULTS) '
            "ON COMMIT DELETE ROWS"
        )
        cursor.execute(f'TRUNCATE "{stage}"')
        with cursor.copy(f'COPY "{stage}" ({columns}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(
                    [
                        (row[name] if name in row else value(row, name, default))
                        if process is None
                        else process(row[name] if name in row else value(row, name, default))
                        for name, process, default in columns_with
                    ]
                )
        cursor.execute(
            f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM "{stage}" '
            f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
        )
        return int(cursor.rowcount or 0)
    finally:
        cursor.close()
