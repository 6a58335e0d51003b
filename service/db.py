"""Engine and session factory for Postgres (production) or SQLite (embedded mode)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import Any

import psycopg
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
# cannot carry more than 65,535 parameters at all (bench/export.py measures the COPY path).
COPY_MIN_ROWS = 64

_SAVEPOINT = "insert_ignore_copy"


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
    """`insert_ignore` on Postgres through a binary COPY straight into the table.

    Postgres has no `COPY … ON CONFLICT`, so the conflicts are settled first: the batch keeps
    the first row of each key (as one INSERT … ON CONFLICT DO NOTHING would), one indexed
    lookup finds the keys the table already holds, and the rest is copied into the table
    itself inside a savepoint. A concurrent writer can still store one of those keys between
    the lookup and the COPY: the COPY then fails with a unique violation, the savepoint is
    rolled back, and the rows take the staged path (COPY into a temporary table, then one
    INSERT … SELECT … ON CONFLICT DO NOTHING), which settles conflicts row by row. The direct
    COPY writes each row once, where the staged path writes it twice and inserts each row
    speculatively.

    Values pass through the columns' own SQLAlchemy bind processing, so they are stored
    exactly as the VALUES path stores them (a JSON None as JSON null, enums as their values),
    and are sent in binary with the types the catalog gives the columns (psycopg's
    `set_types`): Postgres applies no input cast to binary COPY data.
    """
    names, columns = _bound_columns(session, table, rows)
    key_at = [names.index(c) for c in conflict]
    key_columns = [columns[i] for i in key_at]
    records = _first_of_each_key(list(zip(*columns, strict=True)), key_columns)
    if len(records) < len(rows):  # the keys of the records kept
        key_columns = [[record[i] for record in records] for i in key_at]
    session.flush()
    connection = session.connection().connection
    cursor = connection.cursor()
    try:
        types = _column_types(connection, cursor, table.name)
        existing = _existing_keys(cursor, table.name, conflict, types, key_columns)
        new = [record for i, record in enumerate(records) if i not in existing]
        if not new:
            return 0
        names_sql = ", ".join(f'"{name}"' for name in names)
        oids = [types[name][0] for name in names]
        cursor.execute(f"SAVEPOINT {_SAVEPOINT}")
        try:
            _copy_binary(cursor, f'"{table.name}" ({names_sql})', oids, new)
        except psycopg.errors.UniqueViolation:
            # A key stored since the lookup (or a violation of another unique constraint: the
            # staged path raises that one again, as ON CONFLICT on this key would).
            cursor.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            cursor.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            return _staged_insert_ignore(cursor, table.name, names_sql, oids, new, conflict)
        cursor.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
        return len(new)
    finally:
        cursor.close()


def _bound_columns(
    session: Session, table: Table, rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[list[Any]]]:
    """The rows' column names, and each column's values (one per row) as the database receives
    them: Python-side column defaults applied (uuid4 ids, 0 counters, {} for JSON:
    SQLAlchemy's to apply, as the VALUES path does; COPY would leave them NULL), then the
    column type's bind processing. A key some rows lack is NULL in those rows. Built a column
    at a time: C-level map() over a column costs a fraction of a Python test per cell."""
    defaults = {
        column.name: column.default
        for column in table.columns
        if isinstance(column.default, ColumnDefault)
        and (column.default.is_scalar or column.default.is_callable)
    }
    given = list(rows[0])
    given += sorted(set().union(*rows).difference(given))  # keys some rows have, the first not
    names = given + [name for name in defaults if name not in given]
    dialect = session.get_bind().dialect
    columns = []
    for name in names:
        default = defaults.get(name)
        if name not in given and default is not None:  # no row has it (ids, often)
            values = (
                [default.arg] * len(rows)
                if default.is_scalar
                else [default.arg(None) for _ in rows]
            )
        else:
            try:
                values = list(map(itemgetter(name), rows))  # every row has it: the usual case
            except KeyError:
                values = [
                    row[name]
                    if name in row
                    else None
                    if default is None
                    else default.arg
                    if default.is_scalar
                    else default.arg(None)
                    for row in rows
                ]
        process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        columns.append(values if process is None else list(map(process, values)))
    return names, columns


def _constant(column: list[Any]) -> bool:
    """Whether a column holds one value (C-level: `count` compares by identity first, and a
    batch's rows usually share the very object, e.g. the job's id)."""
    return column.count(column[0]) == len(column)


def _first_of_each_key(
    records: list[tuple[Any, ...]], key_columns: list[list[Any]]
) -> list[tuple[Any, ...]]:
    """The records less those whose conflict key an earlier record has: what one INSERT …
    ON CONFLICT DO NOTHING keeps of a batch. A key with a NULL in it never conflicts (NULLs
    are distinct in a unique index), so its records all stay."""
    varying = []
    for column in key_columns:
        if not _constant(column):
            varying.append(column)
        elif column[0] is None:
            return records  # a NULL in every key
    if not varying:
        return records[:1]  # one key, however many records
    keys: list[Any] = varying[0] if len(varying) == 1 else list(zip(*varying, strict=True))
    if len(set(keys)) == len(keys):  # no key twice: the usual case, checked in C
        return records
    seen: set[Any] = set()
    kept = []
    for record, key in zip(records, keys, strict=True):
        if key is None or (len(varying) != 1 and None in key):
            kept.append(record)
        elif key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def _column_types(connection: Any, cursor: Any, table: str) -> dict[str, tuple[int, str]]:
    """Each column's type as the catalog has it (oid, SQL name), read once per connection."""
    cache: dict[str, dict[str, tuple[int, str]]] = connection.info.setdefault(
        "insert_ignore_column_types", {}
    )
    if table not in cache:
        cursor.execute(
            "SELECT attname, atttypid::int, format_type(atttypid, NULL) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (f'"{table}"',),
        )
        cache[table] = {name: (oid, sql) for name, oid, sql in cursor.fetchall()}
    return cache[table]


def _existing_keys(
    cursor: Any,
    table: str,
    conflict: Sequence[str],
    types: dict[str, tuple[int, str]],
    key_columns: list[list[Any]],
) -> set[int]:
    """The positions of the keys the table already holds, found in one statement: the keys
    sent in binary as arrays, each probed along the unique index (LATERAL … LIMIT 1 keeps the
    planner on index probes: a batch is small beside the table). A key column with one value
    in the whole batch (examples: the job) is sent once, not once per row."""
    probed = [i for i, key in enumerate(zip(*key_columns, strict=True)) if None not in key]
    if not probed:
        return set()
    if len(probed) < len(key_columns[0]):
        key_columns = [[column[i] for i in probed] for column in key_columns]
    constant = [_constant(column) for column in key_columns]
    if all(constant):  # one key: probed as an array of one all the same
        constant = [False] * len(constant)
    arrays, scalars, unnest, match = [], [], [], []
    for name, column, one in zip(conflict, key_columns, constant, strict=True):
        sql_type = types[name][1]
        if one:
            scalars.append(column[0])
            match.append(f't."{name}" = %b::{sql_type}')
        else:
            arrays.append(column)
            unnest.append(f"%b::{sql_type}[]")
            match.append(f't."{name}" = k.k{len(arrays) - 1}')
    keys = ", ".join(unnest)
    aliases = ", ".join(f"k{j}" for j in range(len(arrays)))
    cursor.execute(
        f"SELECT k.ord FROM unnest({keys}) WITH ORDINALITY AS k({aliases}, ord) "
        f'CROSS JOIN LATERAL (SELECT 1 FROM "{table}" AS t WHERE {" AND ".join(match)} '
        "LIMIT 1) AS hit",
        [*arrays, *scalars],
    )
    return {probed[int(ord_) - 1] for (ord_,) in cursor.fetchall()}


def _copy_binary(
    cursor: Any, target: str, oids: list[int], records: Sequence[Sequence[Any]]
) -> None:
    with cursor.copy(f"COPY {target} FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(oids)
        for record in records:
            copy.write_row(record)


def _staged_insert_ignore(
    cursor: Any,
    table: str,
    columns: str,
    oids: list[int],
    records: Sequence[Sequence[Any]],
    conflict: Sequence[str],
) -> int:
    """COPY into a temporary staging table (private to the connection, emptied at commit),
    then one INSERT … SELECT … ON CONFLICT DO NOTHING: conflicts settled row by row."""
    stage = f"_stage_{table}"
    cursor.execute(
        f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" (LIKE "{table}" INCLUDING DEFAULTS) '
        "ON COMMIT DELETE ROWS"
    )
    cursor.execute(f'TRUNCATE "{stage}"')
    _copy_binary(cursor, f'"{stage}" ({columns})', oids, records)
    cursor.execute(
        f'INSERT INTO "{table}" ({columns}) SELECT {columns} FROM "{stage}" '
        f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
    )
    return int(cursor.rowcount or 0)
