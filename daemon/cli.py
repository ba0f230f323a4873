"""`energy-ingest`: run the daemon, apply migrations, provision broker users, and (from the
`simulator` package, imported only by those commands) simulate a fleet and benchmark."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import pwd
import sys
from datetime import UTC, datetime
from pathlib import Path

import uvloop
from pydantic import ValidationError

from broker.tls import TlsFilesError
from daemon.app import endpoints, prepare_database, serve
from daemon.config import Settings
from daemon.embedded import ServiceError
from daemon.provision import BrokerFiles, ProvisionError, Role, provision
from db.errors import DatabaseSetupError
from db.pool import WrongSchema, connect
from db.rollup import rebuild


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in error.errors()
        )
        sys.exit(f"energy-ingest: bad configuration: {problems}")


async def _migrate(settings: Settings) -> None:
    async with endpoints(settings, broker=False) as urls:
        await prepare_database(settings, urls.database_url)
        logging.getLogger("energy-ingest").info("migrations applied, partitions in place")


def _instant(raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not ISO 8601") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{raw!r} needs an offset (Z or +hh:mm)")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{raw!r} is outside the calendar in UTC") from None


async def _rebuild_rollups(settings: Settings, start: datetime, end: datetime) -> None:
    async with endpoints(settings, broker=False) as urls:
        conn = await connect(
            urls.database_url, schema=settings.db_schema, pooler=settings.db_pooler
        )
        try:
            await rebuild(conn, start, end)
        finally:
            await conn.close()
    logging.getLogger("energy-ingest").info(
        "hourly roll-ups summed again from the history for %s to %s", start, end
    )


def _uid(owner: str | None) -> int | None:
    if owner is None:
        return None
    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ProvisionError(f"no user {owner!r} on this machine (give a uid)") from None


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process that holds a buffer of readings.

    With tens of thousands of readings waiting in the buffer, CPython's default thresholds
    (a young collection every 700 allocations, older ones walking every live object) took
    about 40 % of the Python cost of an MQTT message (see BENCHMARKS.md). The objects made
    by the imports (modules, pydantic schemas) are moved out of the collector's sight, and
    a young collection waits for 50,000 allocations. The hot path makes few reference
    cycles; those it makes are still collected, only later (peak RSS in BENCHMARKS.md).
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _drive(command: str, argv: list[str]) -> None:
    """`bench` and `simulate` drive the daemon from outside: their package is imported here
    only, so that `energy-ingest run` never loads it."""
    from simulator import bench, simulate

    parser = argparse.ArgumentParser(prog=f"energy-ingest {command}")
    if command == "bench":
        bench.add_arguments(parser)
        logging.basicConfig(level="WARNING")
        bench.main(parser.parse_args(argv))
        return
    simulate.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    simulate.main(args, _settings())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="energy-ingest",
        description="Telemetry of smart meters and EV chargers (MQTT/HTTP) into PostgreSQL.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="MQTT subscriber and HTTP API in one process")
    commands.add_parser("migrate", help="apply pending schema migrations and create partitions")
    provisioning = commands.add_parser(
        "provision",
        help="give a device or a daemon replica its broker user; prints its password",
        description="Adds or replaces ID in Mosquitto's password file and ACL. A meter may "
        "then publish only to meters/ID/telemetry, a vehicle only to vehicles/ID/telemetry, a "
        "daemon replica may only read telemetry. Reload the broker afterwards (SIGHUP).",
    )
    provisioning.add_argument("role", choices=[r.value for r in Role])
    provisioning.add_argument("id", help="the device id (meterId / vehicleId), or a replica name")
    provisioning.add_argument(
        "--password-file",
        type=Path,
        default=Path("deploy/mosquitto/passwd"),
        help="Mosquitto password file (default: %(default)s)",
    )
    provisioning.add_argument(
        "--acl-file",
        type=Path,
        default=Path("deploy/mosquitto/acl"),
        help="Mosquitto ACL file (default: %(default)s)",
    )
    provisioning.add_argument(
        "--owner",
        help="user (name or uid) who owns both files: the broker's own, which reads them "
        "after dropping root (1883 in the eclipse-mosquitto image); default: keep the owner",
    )
    provisioning.add_argument("--password", help="use this password instead of a random one")
    rebuilding = commands.add_parser(
        "rebuild-rollups",
        help="sum the hourly roll-ups again from the history, after an import by SQL",
        description="Analytics read whole hours from hourly roll-ups that the daemon keeps as "
        "it stores readings. Readings written into the history by other means (COPY, "
        "INSERT, a restore) are not in them until their hours are summed again: every hour "
        "that [START, END) touches, every device, in one transaction. Run it over hours no "
        "daemon is storing readings for (past ones): a daemon's additions to those hours "
        "while it runs could be replaced.",
    )
    rebuilding.add_argument("start", type=_instant, help="ISO 8601 with an offset")
    rebuilding.add_argument("end", type=_instant, help="ISO 8601 with an offset (exclusive)")
    commands.add_parser(
        "bench",
        help="run a benchmark (results in bench/results/, see BENCHMARKS.md)",
        add_help=False,
    )
    commands.add_parser(
        "simulate",
        help="a fleet of meters and vehicles publishing over MQTT or HTTP",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command in ("bench", "simulate"):
        _drive(args.command, rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "provision":
        try:
            files = BrokerFiles(args.password_file, args.acl_file, _uid(args.owner))
            print(provision(files, Role(args.role), args.id, args.password))
        except (ProvisionError, OSError) as error:
            sys.exit(f"energy-ingest: {error}")
        return

    settings = _settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "run":
            tune_gc()
            # uvloop: the same asyncio, with a faster event loop (and uvicorn then uses
            # httptools); measured in BENCHMARKS.md.
            if not uvloop.run(serve(settings)):
                sys.exit("energy-ingest: stopped because a part of the daemon failed (see above)")
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "rebuild-rollups":
            if args.start >= args.end:
                sys.exit("energy-ingest: START must come before END")
            asyncio.run(_rebuild_rollups(settings, args.start, args.end))
    except (ServiceError, TlsFilesError, WrongSchema, DatabaseSetupError) as error:
        logging.getLogger("energy-ingest").error("%s", error)
        sys.exit(f"energy-ingest: {error}")
    except KeyboardInterrupt:
        pass
