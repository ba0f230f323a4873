"""`energy-ingest bench SCENARIO`: run a benchmark, print medians, write JSON results."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from simulator.bench_analytics import analytics
from simulator.bench_fleet import fleet, series
from simulator.bench_http import http
from simulator.bench_mqtt import drain, live
from simulator.bench_operators import operators
from simulator.benchkit import Result, services

SCENARIOS = (
    "mqtt-drain",
    "mqtt-drain-arrays",
    "mqtt-live",
    "http-single",
    "http-batch",
    "analytics",
    "fleet",
    "series",
    "operators",
)

# Runs of these scenarios differ by one parameter: medians are taken per value.
GROUP_BY = {
    "mqtt-live": "multiple",
    "analytics": "group",
    "fleet": "case",
    "operators": "build",
    "mqtt-drain": "build",
    "mqtt-drain-arrays": "build",
}

HTTP_KEYS = [
    "requests_per_s",
    "p50_ms",
    "p99_ms",
    "non_2xx",
    "daemon_cpu_share",
    "box_busy_cores",
    "box_steal_cores",
    "peak_rss_mb",
]
SUMMARY_KEYS = {
    "mqtt-drain": [
        "readings_per_s",
        "bare_insert_1_connection_per_s",
        "bare_insert_per_s",
        "ratio_to_bare_insert_1_connection",
        "ratio_to_bare_insert",
        "ceiling_1_connection_per_s",
        "ceiling_readings_per_s",
        "ratio_to_ceiling",
        "daemon_cpu_share",
        "box_busy_cores",
        "box_steal_cores",
        "peak_rss_mb",
        "mean_flush_readings",
    ],
    "mqtt-live": ["lag_p50_ms", "lag_p99_ms", "daemon_cpu_share", "peak_rss_mb"],
    "http-single": HTTP_KEYS,
    "http-batch": ["readings_per_s", *HTTP_KEYS],
    "analytics": [
        "p50_ms",
        "p99_ms",
        "requests_per_s",
        "c16_requests_per_s",
        "c16_p50_ms",
        "c16_p99_ms",
        "server_cpu_us_per_request",
        "postgres_cpu_us_per_request",
    ],
    "fleet": ["p50_ms", "p99_ms", "requests_per_s"],
    "series": ["p50_ms", "p99_ms", "requests_per_s"],
    "operators": [
        "lag_since_reading_p50_ms",
        "lag_since_reading_p99_ms",
        "lag_since_receive_p99_ms",
        "stored_after_publisher_end_s",
        "health_non_200",
        "health_slowest_ms",
        "loop_lag_max_ms",
        "loop_samples_over_budget",
        "loop_over_budget_running",
        "loop_over_budget_waiting_for_cpu",
        "fleet_requests_per_s",
        "fleet_non_2xx",
        "fleet_p50_ms",
        "fleet_p99_ms",
        "daemon_cpu_share",
        "peak_rss_mb",
    ],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument("--short", action="store_true", help="a quick version (make bench)")
    parser.add_argument(
        "--compare-with",
        type=Path,
        metavar="PATH",
        help="operators, analytics, fleet, mqtt-drain(-arrays): also run the daemon of this "
        "other checkout (a build before a change), alternating with this one's, on the same data",
    )
    parser.add_argument(
        "--design-point-only",
        action="store_true",
        help="fleet: only the design point (not the history's growth)",
    )
    parser.add_argument(
        "--peer",
        metavar="COMMAND",
        help="analytics: also measure this server of the same route (given DATABASE_URL and "
        "PORT), e.g. 'node scripts/peer-nestjs/dist/main.js'",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=64,
        help="http-single / http-batch: concurrent connections of wrk (default %(default)s)",
    )


def run_one(name: str, args: argparse.Namespace) -> Result:
    short = args.short
    with services() as svc:
        if name == "mqtt-drain":
            return drain(
                svc,
                readings=40_000 if short else 200_000,
                array=1,
                runs=args.runs,
                compare_with=args.compare_with,
            )
        if name == "mqtt-drain-arrays":
            return drain(
                svc,
                readings=60_000 if short else 240_000,
                array=60,
                runs=args.runs,
                compare_with=args.compare_with,
            )
        if name == "mqtt-live":
            return live(svc, multiples=[1, 10, 30], seconds=5 if short else 20, runs=args.runs)
        if name in ("http-single", "http-batch"):
            return http(
                svc,
                batch=500 if name == "http-batch" else 0,
                seconds=5 if short else 20,
                connections=args.connections,
                runs=args.runs,
            )
        if name == "fleet":
            return fleet(
                svc,
                devices=1000 if short else 10_000,
                step_min=1,
                growth_days=[1, 7 if short else 30],
                growth_step_min=15,
                seconds=3 if short else 20,
                runs=args.runs,
                compare_with=args.compare_with,
                stages_wanted=1 if args.design_point_only else None,
            )
        if name == "operators":
            return operators(
                svc,
                vehicles=4000 if short else 40_000,
                hours=24,
                step_min=30,
                rate=3334,  # 10x the design point: 20,000 devices, a reading a minute each
                seconds=10 if short else 60,
                readers=20,
                runs=args.runs,
                compare_with=args.compare_with,
            )
        if name == "series":
            return series(
                svc,
                devices=50 if short else 200,
                days=7 if short else 30,
                step_min=1,
                seconds=3 if short else 10,
                runs=args.runs,
            )
        return analytics(
            svc,
            devices=200 if short else 2000,
            days=[1, 7 if short else 30],
            step_min=5,
            seconds=3 if short else 10,
            runs=args.runs,
            peer_command=args.peer,
            compare_with=args.compare_with,
        )


def main(args: argparse.Namespace) -> None:
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    for name in names:
        print(f"== {name}", flush=True)
        result = run_one(name, args)
        path = result.save()
        keys = SUMMARY_KEYS.get(name.removesuffix("-arrays"), [])
        print(result.summary(keys, group_by=GROUP_BY.get(name)))
        print(f"  written to {path}", flush=True)


def command(argv: list[str]) -> None:
    """`energy-ingest bench`: the daemon finds this through its entry point (group
    `energy_ingest.commands`), so `energy-ingest run` never imports the simulator."""
    parser = argparse.ArgumentParser(prog="energy-ingest bench")
    add_arguments(parser)
    logging.basicConfig(level="WARNING")
    main(parser.parse_args(argv))
