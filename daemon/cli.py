"""`energy-ingest`: run the daemon, apply migrations, provision broker users, sum roll-ups
again; and the commands other packages register (the simulator's `simulate` and `bench`,
entry point group `energy_ingest.commands`), imported only when they run."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import pwd
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import NoReturn, TypeAlias

import uvloop

from broker.tls import TlsFilesError
from daemon.app import serve
from daemon.database import prepare_database
from daemon.logs import JsonFormatter, configure_logging
from daemon.provision import BrokerFiles, ProvisionError, Role, provision
from daemon.services import ServiceError, private_services
from db.errors import DatabaseSetupError
from db.pool import WrongSchema, connect
from db.rollup import rebuild
from ingest.config import BadConfiguration, Settings, settings_or_raise


async def _migrate(settings: Settings) -> None:
    async with private_services(settings, broker=False) as urls:
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
    async with private_services(settings, broker=False) as urls:
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


Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _extra_commands() -> dict[str, metadata.EntryPoint]:
    """Commands of other packages (the simulator's `bench` and `simulate`), found by their
    entry points and imported only when run: `energy-ingest run` never loads them."""
    return {ep.name: ep for ep in metadata.entry_points(group="energy_ingest.commands")}


def _parser(extra: dict[str, metadata.EntryPoint]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="energy-ingest",
        description="Telemetry of smart meters and EV chargers (MQTT/HTTP) into PostgreSQL.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="MQTT subscriber and HTTP API in one process")
    commands.add_parser("migrate", help="apply pending schema migrations and create partitions")
    _add_provision(commands)
    _add_rebuild(commands)
    for name, entry in sorted(extra.items()):
        commands.add_parser(name, help=f"from {entry.module}: {name} --help", add_help=False)
    return parser


def _add_provision(commands: Commands) -> None:
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


def _add_rebuild(commands: Commands) -> None:
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


def main(argv: list[str] | None = None) -> None:
    extra = _extra_commands()
    args, rest = _parser(extra).parse_known_args(argv)
    if args.command in extra:
        extra[args.command].load()(rest)
        return
    if rest:
        _parser(extra).error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "provision":
        try:
            files = BrokerFiles(args.password_file, args.acl_file, _uid(args.owner))
            print(provision(files, Role(args.role), args.id, args.password))
        except (ProvisionError, OSError) as error:
            sys.exit(f"energy-ingest: {error}")
        return
    if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":
        configure_logging("INFO", "json")  # (even a bad configuration is said in JSON)
    try:
        settings = settings_or_raise()
    except BadConfiguration as error:
        _exit(str(error))
    configure_logging(settings.log_level, settings.log_format)
    try:
        _run(args, settings)
    except (ServiceError, TlsFilesError, WrongSchema, DatabaseSetupError) as error:
        logging.getLogger("energy-ingest").error("%s", error)
        _exit(str(error), logged=True)
    except KeyboardInterrupt:
        pass


def _exit(message: str, *, logged: bool = False) -> NoReturn:
    """Ends the process, status 1, with `message` on stderr: in plain text, or, when logs are
    JSON, as a log line like any other (once: not again if it was `logged`)."""
    root = logging.getLogger()
    if any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers):
        if not logged:
            logging.getLogger("energy-ingest").critical("%s", message)
        sys.exit(1)
    sys.exit(f"energy-ingest: {message}")


def _run(args: argparse.Namespace, settings: Settings) -> None:
    if args.command == "run":
        tune_gc()
        # uvloop: the same asyncio, with a faster event loop (and uvicorn then uses
        # httptools); measured in BENCHMARKS.md.
        if not uvloop.run(serve(settings)):
            _exit("stopped because a part of the daemon failed (see above)")
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "rebuild-rollups":
        if args.start >= args.end:
            _exit("START must come before END")
        asyncio.run(_rebuild_rollups(settings, args.start, args.end))
