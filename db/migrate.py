"""Versioned SQL migrations (`db/migrations/NNNN_name.sql`), applied once each, in order.

Safe from several processes at once: the whole run is one transaction holding a
transaction-level advisory lock, so a second migrator waits, then finds nothing left to do.
No session state: it runs through a transaction pooler as well as directly. (A migration
that cannot run inside a transaction, such as CREATE INDEX CONCURRENTLY, would need a run of
its own on a direct connection; there is none so far.)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from db.tables import MIGRATIONS

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

CREATE_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS} (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("db").joinpath("migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def lock_key(schema: str, purpose: str) -> str:
    """Text hashed by PostgreSQL (hashtext) into an advisory lock id for one schema."""
    return f"energy-ingest:{purpose}:{schema}"


async def migrate(conn: asyncpg.Connection, *, schema: str) -> list[Migration]:
    """Apply the pending migrations; returns those this call applied."""
    applied_now: list[Migration] = []
    await _apply(conn, schema, applied_now)
    for migration in applied_now:
        log.info("applied migration %04d_%s", migration.version, migration.name)
    return applied_now


def _said(conn: asyncpg.Connection, message: asyncpg.PostgresLogMessage) -> None:
    log.warning("migration: %s", message.message)


async def _apply(conn: asyncpg.Connection, schema: str, applied_now: list[Migration]) -> None:
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", lock_key(schema, "migrate")
        )
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path = "{schema}"')
        await conn.execute(CREATE_LEDGER)
        done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {MIGRATIONS}")}
        for migration in available_migrations():
            if migration.version in done:
                continue
            # What a migration says it changed (RAISE NOTICE) goes to the log.
            conn.add_log_listener(_said)
            try:
                await conn.execute(migration.sql)
            finally:
                conn.remove_log_listener(_said)
            await conn.execute(
                f"INSERT INTO {MIGRATIONS} (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration)
