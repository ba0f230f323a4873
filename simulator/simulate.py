"""`energy-ingest simulate`: a fleet publishing realistic readings over MQTT or HTTP.

Readings start at `--start` (in the past to backfill history) and go on minute by minute;
a share arrives late (out of order) and a share twice, as from real devices and gateways.
For load, several processes publish prepared packets with QoS 1 pipelined (simulator.publisher).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import random
import time
from datetime import UTC, datetime, timedelta

import httpx

from ingest.config import MqttEndpoint, Settings, settings_or_exit
from simulator.fleet import Fleet, as_arrays, spoiled
from simulator.publisher import RawPublisher

log = logging.getLogger("energy-ingest.simulate")
Message = tuple[str, bytes]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meters", type=int, default=100, help="meters, one per charger")
    parser.add_argument("--vehicles", type=int, default=100)
    parser.add_argument("--minutes", type=int, default=60, help="heartbeats per device")
    parser.add_argument(
        "--start",
        type=float,
        default=0.0,
        help="hours before now of the first heartbeat (backfill)",
    )
    parser.add_argument("--transport", choices=["mqtt", "http"], default="mqtt")
    parser.add_argument("--qos", type=int, choices=[0, 1], default=1)
    parser.add_argument(
        "--array",
        type=int,
        default=1,
        help="readings per message (a gateway's array; HTTP: batch size)",
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="messages a second in all (0: as fast as possible)"
    )
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--faulty-share", type=float, default=0.1)
    parser.add_argument("--late-share", type=float, default=0.02)
    parser.add_argument("--duplicate-share", type=float, default=0.02)
    parser.add_argument(
        "--link",
        action="store_true",
        help="first link every vehicle to its meter over HTTP (from now)",
    )
    parser.add_argument("--http-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None, help="bearer key of the ingest role")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--prefix", default="", help="put before every device id")
    parser.add_argument(
        "--live",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then go on live: a heartbeat of every device every SECONDS, stamped with the "
        "moment it is sent, until Ctrl-C (or --rounds)",
    )
    parser.add_argument("--rounds", type=int, default=0, help="live heartbeats to send (0: no end)")
    parser.add_argument(
        "--bad-share",
        type=float,
        default=0.0,
        help="live: this share of heartbeats also sent spoiled (cut short, negative energy, "
        "a day ahead), for the rejections page",
    )


def messages(args: argparse.Namespace, fleet: Fleet) -> list[Message]:
    rng = random.Random(args.seed)
    now = datetime.now(UTC)
    # Timestamps are written to the millisecond (cut, not rounded): start on the next whole
    # millisecond, so that a reading made just after a link (--link) is never written as a
    # moment before it.
    now += timedelta(microseconds=(1000 - now.microsecond % 1000) % 1000)
    first = now - timedelta(hours=args.start)
    heartbeats: list[Message] = []
    for minute in range(args.minutes):
        heartbeats.extend(fleet.minute(first + timedelta(minutes=minute)))
    late = [m for m in heartbeats if rng.random() < args.late_share]
    late_set = set(late)
    on_time = [m for m in heartbeats if m not in late_set]
    copies = [m for m in heartbeats if rng.random() < args.duplicate_share]
    ordered = on_time + late + copies  # late ones after newer readings, copies at the end
    return as_arrays(ordered, args.array)


def _mqtt_worker(
    job: tuple[str, int, str | None, str | None, list[Message], float, int, int],
) -> int:
    host, port, user, password, share, rate, qos, worker = job
    publisher = RawPublisher(
        host,
        port,
        client_id=f"simulator-{worker}-{time.time_ns()}",
        username=user,
        password=password,
    )
    try:
        if rate > 0:
            return publisher.paced(share, rate_per_s=rate, qos=qos)
        return publisher.publish_many(share, qos=qos)
    finally:
        publisher.close()


def publish_mqtt(args: argparse.Namespace, endpoint: MqttEndpoint, items: list[Message]) -> int:
    processes = max(1, args.processes)
    jobs = [
        (
            endpoint.host,
            endpoint.port,
            endpoint.username,
            endpoint.password,
            items[n::processes],
            args.rate / processes,
            args.qos,
            n,
        )
        for n in range(processes)
    ]
    if processes == 1:
        return _mqtt_worker(jobs[0])
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return sum(pool.map(_mqtt_worker, jobs))


def publish_http(args: argparse.Namespace, items: list[Message]) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sent = 0
    started = time.perf_counter()
    with httpx.Client(base_url=args.http_url, headers=headers, timeout=30) as client:
        for topic, payload in items:
            kind = "meter" if topic.startswith("meters/") else "vehicle"
            if payload.startswith(b"["):
                response = client.post(
                    f"/v1/ingestion/{kind}/batch", content=b'{"readings":' + payload + b"}"
                )
            else:
                response = client.post(f"/v1/ingestion/{kind}", content=payload)
            if response.status_code >= 300:
                log.warning("%s: %d %s", topic, response.status_code, response.text[:200])
            sent += 1
            if args.rate > 0:
                time.sleep(max(0.0, sent / args.rate - (time.perf_counter() - started)))
    return sent


def link(args: argparse.Namespace, fleet: Fleet) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.http_url, headers=headers, timeout=30) as client:
        for body in fleet.links():
            client.put("/v1/links", json=body).raise_for_status()
    log.info("linked %d vehicles to their chargers' meters", len(fleet.vehicles))


def main(args: argparse.Namespace, settings: Settings) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per link
    fleet = Fleet(
        meters=args.meters,
        vehicles=args.vehicles,
        faulty_share=args.faulty_share,
        seed=args.seed,
        prefix=args.prefix,
    )
    if args.link:
        link(args, fleet)
    items = messages(args, fleet)
    readings = sum(p.count(b'"timestamp"') for _, p in items)
    log.info(
        "%d readings in %d messages; faulty chargers: %s",
        readings,
        len(items),
        ", ".join(sorted(fleet.faulty)[:10]) or "none",
    )
    started = time.perf_counter()
    if args.transport == "mqtt":
        endpoint = MqttEndpoint(settings.mqtt_url or "mqtt://127.0.0.1:1883")
        sent = publish_mqtt(args, endpoint, items)
    else:
        sent = publish_http(args, items)
    elapsed = time.perf_counter() - started
    log.info("sent %d messages in %.1f s (%.0f messages/s)", sent, elapsed, sent / elapsed)
    if args.live > 0:
        go_live(args, settings, fleet)


def go_live(args: argparse.Namespace, settings: Settings, fleet: Fleet) -> None:
    """A heartbeat of every device every `--live` seconds, stamped now; a share of them
    sent twice, as redeliveries are."""
    rng = random.Random(args.seed + 1)
    endpoint = MqttEndpoint(settings.mqtt_url or "mqtt://127.0.0.1:1883")
    publisher = None
    if args.transport == "mqtt":
        publisher = RawPublisher(
            endpoint.host,
            endpoint.port,
            client_id=f"simulator-live-{time.time_ns()}",
            username=endpoint.username,
            password=endpoint.password,
        )
    log.info(
        "live: a heartbeat of %d devices every %.1f s",
        len(fleet.meters) + len(fleet.vehicles),
        args.live,
    )
    rounds = 0
    try:
        while not args.rounds or rounds < args.rounds:
            started = time.monotonic()
            beat = fleet.minute(datetime.now(UTC), share_of_minute=args.live / 60)
            beat += [m for m in beat if rng.random() < args.duplicate_share]
            bad = [spoiled(m, rng) for m in beat if rng.random() < args.bad_share]
            if publisher is not None:
                publisher.publish_many(beat + bad, qos=args.qos)
            else:  # (each spoiled reading alone, so that it spoils no batch)
                publish_http(args, as_arrays(beat, args.array) + bad)
            rounds += 1
            time.sleep(max(0.0, args.live - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        if publisher is not None:
            publisher.close()
    log.info("live: %d heartbeats sent", rounds)


def command(argv: list[str]) -> None:
    """`energy-ingest simulate` (entry point group `energy_ingest.commands`)."""
    parser = argparse.ArgumentParser(prog="energy-ingest simulate")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    main(args, settings_or_exit())
