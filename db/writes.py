"""The flush transaction: a whole batch of readings and rejections in one SQL statement.

For each stream, the statement inserts the history rows (a (device, ts) already stored is
skipped, not an error: the first stored value stands), appends what it stored, summed by
device and hour, to the roll-ups' deltas (`db.rollup` folds them in), and upserts the
latest row per device from what the history took, guarded so that an older reading never
overwrites a newer state (so the latest state is always a row of the history); then it
records the rejections. When some rows were already stored, the
statement also says which rows it stored and what the others hold, so that a copy (a
duplicate) can be told from another reading at the same moment (a conflict). Arrays travel through
`unnest`, never a statement per reading; the latest rows are written in device-id order so
that two daemons cannot deadlock.

One statement is one transaction: all of it commits or none of it does, with no BEGIN or
COMMIT round trips around it. Under load those round trips each waited for a turn of a busy
event loop, and set the pace of HTTP requests waiting for their commit (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from db.tables import REJECTIONS, STREAMS, StreamTables

REJECTION_COLUMNS = ("received_at", "source", "topic_or_route", "payload", "reason")
REJECTION_TYPES = ("timestamptz", "text", "text", "text", "text")


# Each stored reading added to its device's hour, from what the history insert returned: so
# a duplicate (not inserted) is never counted, nor a reading the history refuses (the whole
# statement fails), and a late reading goes to its own hour. Appended to the deltas (no index,
# no conflict: nothing to look up or lock), folded into the roll-ups later (`db.rollup.fold`).
_HOURLY = {
    "meter": """
    INSERT INTO {t.deltas} (meter_id, hour, kwh_consumed_ac, readings)
    SELECT meter_id, date_trunc('hour', ts, 'UTC'), sum(kwh_consumed_ac), count(*)
    FROM {s}_inserted GROUP BY 1, 2""",
    "vehicle": """
    INSERT INTO {t.deltas}
        (vehicle_id, hour, kwh_delivered_dc, readings, battery_temp_sum, last_ts, last_soc)
    SELECT vehicle_id, date_trunc('hour', ts, 'UTC'), sum(kwh_delivered_dc), count(*),
           sum(battery_temp), max(ts), (array_agg(soc ORDER BY ts DESC))[1]
    FROM {s}_inserted GROUP BY 1, 2""",
}


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
# `interval '1 microsecond'` times an int8 multiplies as float8: exact below 2^53 us, years
# 1685 to 2255. A reading is refused far inside that (retention, future skew).
EXACT_US = 2**53


def text_array(values: Sequence[str]) -> str:
    """An array literal of these strings, each quoted (so "NULL" stays a string)."""
    if not values:
        return "{}"
    body = '","'.join(values)
    if "\\" in body or body.count('"') != 2 * (len(values) - 1):  # a quote or a backslash
        body = '","'.join(v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return '{"' + body + '"}'


def microseconds_array(values: Sequence[datetime]) -> str:
    """An array literal of these aware datetimes as microseconds since the epoch."""
    us: list[int] = []
    previous, last = None, 0
    for t in values:
        if t is not previous:  # (a message's readings share one received_at: once for all)
            previous, last = t, (t - EPOCH) // MICROSECOND
        us.append(last)
    if us and not -EXACT_US < min(us) <= max(us) < EXACT_US:
        raise ValueError(f"a timestamp beyond {EXACT_US} us from the epoch cannot be stored")
    return "{" + ",".join(map(str, us)) + "}"


# How each column travels. asyncpg encodes an array element by element, with isinstance
# checks against the collections ABCs for each: for 2,000 rows, 0.6 ms of the daemon's CPU for
# the ids and 1.6 ms for each column of timestamps, against 0.02 and 0.67 ms (0.27 when a
# message's readings share their `received_at`) to write them as one array literal that
# PostgreSQL parses (BENCHMARKS.md, mqtt-drain): ids quoted, timestamps as whole microseconds
# since the epoch. Floats stay with asyncpg (`repr` is no cheaper).
@dataclass(frozen=True, slots=True)
class _Literal:
    """A column sent as one array literal: its parameter, its value in the batch, the text."""

    param: str  # (formatted with n, the parameter's number)
    value: str  # (formatted with c, the column's name)
    encode: Callable[[Any], str]


_LITERALS = {
    "text": _Literal("${n}::text::text[]", "b.{c}", text_array),
    "timestamptz": _Literal(
        "${n}::text::int8[]",
        "timestamptz 'epoch' + b.{c} * interval '1 microsecond' AS {c}",
        microseconds_array,
    ),
}


def _stream_sql(t: StreamTables, first: int) -> tuple[str, str]:
    """The CTEs writing one stream (parameters from `$first`), and what it returns."""
    s, cols = t.stream, ", ".join(t.columns)
    params = ", ".join(
        _LITERALS[typ].param.format(n=n) if typ in _LITERALS else f"${n}::{typ}[]"
        for n, typ in enumerate(t.types, start=first)
    )
    exprs = ", ".join(
        _LITERALS[typ].value.format(c=c) if typ in _LITERALS else f"b.{c}"
        for c, typ in zip(t.columns, t.types, strict=True)
    )
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in t.columns[1:])
    ctes = f"""
{s}_batch AS (
    SELECT {exprs} FROM unnest({params}) AS b({cols})
), {s}_inserted AS (
    INSERT INTO {t.history} ({cols})
    SELECT {cols} FROM {s}_batch
    ON CONFLICT ({t.id_column}, ts) DO NOTHING
    RETURNING {cols}
), {s}_rollup AS ({_HOURLY[s].format(t=t, s=s)}
), {s}_latest AS (
    INSERT INTO {t.latest} AS l ({cols})
    SELECT DISTINCT ON ({t.id_column}) {cols} FROM {s}_inserted ORDER BY {t.id_column}, ts DESC
    ON CONFLICT ({t.id_column}) DO UPDATE SET {updates}
    WHERE l.ts < EXCLUDED.ts
)"""
    # Only the count comes back when every row was new (the common case). When some were
    # already stored: the keys stored now, and the rows stored before (the statement's
    # snapshot, taken before its insert, sees only those).
    stored, offered = f"(SELECT count(*) FROM {s}_inserted)", f"(SELECT count(*) FROM {s}_batch)"
    values = ", ".join(f"h.{c}" for c in t.value_columns)
    returned = f"""
    {stored} AS {s}_stored,
    CASE WHEN {stored} < {offered}
         THEN (SELECT array_agg({t.id_column}) FROM {s}_inserted) END AS {s}_ids,
    CASE WHEN {stored} < {offered} THEN (SELECT array_agg(ts) FROM {s}_inserted) END AS {s}_tss,
    CASE WHEN {stored} < {offered} THEN (
        SELECT array_agg(ROW(h.{t.id_column}, h.ts, {values}))
        FROM {s}_batch b JOIN {t.history} h ON h.{t.id_column} = b.{t.id_column} AND h.ts = b.ts
    ) END AS {s}_before"""
    return ctes, returned


def _flush_sql() -> str:
    ctes, returned, first = [], [], 1
    for t in STREAMS.values():
        stream_ctes, stream_returned = _stream_sql(t, first)
        ctes.append(stream_ctes)
        returned.append(stream_returned)
        first += len(t.columns)
    params = ", ".join(f"${n}::{typ}[]" for n, typ in enumerate(REJECTION_TYPES, start=first))
    ctes.append(f"""
rejected AS (
    INSERT INTO {REJECTIONS} ({", ".join(REJECTION_COLUMNS)})
    SELECT * FROM unnest({params})
)""")
    # (A data-modifying CTE runs to completion whether or not the query reads it.)
    return "WITH" + ",".join(ctes) + "\nSELECT" + ",".join(returned)


FLUSH_SQL = _flush_sql()

Row = tuple[Any, ...]
Key = tuple[str, datetime]


def payload_text(payload: bytes, max_bytes: int) -> str:
    """The payload kept with a rejection, as received: its first `max_bytes` bytes (marked
    with … when cut), as text, each byte that is not text written as `\\xNN`: invalid
    UTF-8, and NUL, which PostgreSQL's text cannot hold."""
    text = payload[:max_bytes].decode("utf-8", errors="backslashreplace")
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text + ("…" if len(payload) > max_bytes else "")


def storable_text(text: str) -> str:
    """Text PostgreSQL accepts: NUL written as `\\x00`, a lone UTF-16 surrogate replaced. A
    rejection must be recordable whatever it quotes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


@dataclass(slots=True)
class RejectionRow:
    received_at: datetime
    source: str
    topic_or_route: str
    payload: str
    reason: str

    @classmethod
    def of(
        cls,
        payload: bytes,
        reason: str,
        *,
        received_at: datetime,
        source: str,
        origin: str,
        max_bytes: int | None = None,
    ) -> RejectionRow:
        """A rejection keeping the payload as received (its first `max_bytes` bytes)."""
        kept = payload_text(payload, len(payload) if max_bytes is None else max_bytes)
        return cls(received_at, source, origin, kept, reason)


@dataclass(frozen=True, slots=True)
class Stored:
    """What one stream's insert stored: when that is fewer rows than were offered, which ones
    (`keys`; None when every offered row was new), and the values of the offered keys that
    were stored before (`before`: key → the value columns, in table order). A key in neither
    was stored meanwhile by another transaction (another daemon): its values are read
    afterwards (`db.writes.stored_values`)."""

    keys: set[Key] | None = None
    before: dict[Key, tuple[Any, ...]] = field(default_factory=dict)

    def is_new(self, key: Key) -> bool:
        return self.keys is None or key in self.keys


@dataclass(slots=True)
class FlushBatch:
    """Rows for one transaction; each row in the column order of `StreamTables.columns`."""

    rows: dict[str, list[Row]] = field(default_factory=lambda: {name: [] for name in STREAMS})
    rejections: list[RejectionRow] = field(default_factory=list)


async def flush_batch(conn: asyncpg.Connection, batch: FlushBatch) -> dict[str, Stored]:
    """Write the batch in one statement (one transaction); returns what each stream stored."""
    args: list[Any] = []
    for name, t in STREAMS.items():
        for column, typ in zip(_columns(batch.rows[name], len(t.columns)), t.types, strict=True):
            args.append(_LITERALS[typ].encode(column) if typ in _LITERALS else column)
    args.extend(_columns([_rejection_row(r) for r in batch.rejections], len(REJECTION_COLUMNS)))
    record = await conn.fetchrow(FLUSH_SQL, *args)
    stored: dict[str, Stored] = {}
    for name, rows in batch.rows.items():
        if not rows:
            continue
        count, ids, tss = record[f"{name}_stored"], record[f"{name}_ids"], record[f"{name}_tss"]
        if count == len(rows):
            stored[name] = Stored()
        else:  # (array_agg of no rows is NULL: none of them was new)
            before = {(r[0], r[1]): tuple(r[2:]) for r in record[f"{name}_before"] or ()}
            stored[name] = Stored(set(zip(ids or (), tss or (), strict=True)), before)
    return stored


STORED_VALUES = {
    name: f"""
SELECT {t.id_column}, ts, {", ".join(t.value_columns)} FROM {t.history}
WHERE ({t.id_column}, ts) IN (SELECT * FROM unnest($1::text[], $2::timestamptz[]))"""
    for name, t in STREAMS.items()
}


async def stored_values(
    conn: asyncpg.Connection, stream: str, keys: Sequence[Key]
) -> dict[Key, tuple[Any, ...]]:
    """The stored values of these keys (read after a commit: what another transaction stored
    while the flush ran)."""
    ids, tss = zip(*keys, strict=True) if keys else ((), ())
    records = await conn.fetch(STORED_VALUES[stream], list(ids), list(tss))
    return {(r[0], r[1]): tuple(r[2:]) for r in records}


def _columns(rows: Sequence[Row], width: int) -> list[Sequence[Any]]:
    return list(zip(*rows, strict=True)) if rows else [() for _ in range(width)]


def _rejection_row(r: RejectionRow) -> Row:
    return (
        r.received_at,
        r.source,
        storable_text(r.topic_or_route),
        storable_text(r.payload),
        storable_text(r.reason),
    )
