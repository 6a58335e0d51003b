"""Migrations on real Postgres: upgrade → downgrade base → upgrade, and no drift from the ORM."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.db import make_engine
from service.models import Base
from tests.conftest import REPO, fresh_database


def _config(url: str) -> Config:
    config = Config(str(REPO / "alembic.ini"))
    config.set_main_option("script_location", str(Path(REPO) / "migrations"))
    config.attributes["url"] = url
    return config


def test_upgrade_downgrade_upgrade_and_no_drift() -> None:
    with fresh_database("distill_migr") as url:
        config = _config(url)
        engine = make_engine(url)
        try:
            command.upgrade(config, "head")
            tables = set(inspect(engine).get_table_names())
            assert set(Base.metadata.tables) <= tables
            command.downgrade(config, "base")
            assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
            command.upgrade(config, "head")
            with engine.connect() as conn:
                diff = compare_metadata(
                    MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
                )
            assert diff == [], diff
        finally:
            engine.dispose()


def test_migrations_also_build_the_embedded_sqlite_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    command.upgrade(_config(url), "head")
    engine = make_engine(url)
    try:
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
