"""HTTP benchmarks: single readings and batches of 500, load from wrk in its own process."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from simulator.benchkit import BoxCpu, Daemon, Result, Services, accepted, reset

WRK_SCRIPT = """
local counter = 0
local base = {base}
local batch = {batch}
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
local function reading()
  counter = counter + 1
  return string.format(
    '{{"meterId":"H%d-%d","kwhConsumedAc":0.5,"voltage":230.1,"timestamp":"%s"}}',
    tid, counter % 1000, os.date("!%Y-%m-%dT%H:%M:%SZ", base + counter))
end
function request()
  local body
  if batch == 0 then
    body = reading()
  else
    local items = {{}}
    for i = 1, batch do items[i] = reading() end
    body = '{{"readings":[' .. table.concat(items, ",") .. ']}}'
  end
  return wrk.format("POST", "{path}", {{["Content-Type"] = "application/json"}}, body)
end
"""


def _latency_ms(text: str, percentile: str) -> float | None:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, flags=re.MULTILINE)
    if not match:
        return None
    value, unit = float(match[1]), match[2]
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(
    url: str, script: str, *, seconds: int, connections: int, threads: int = 2
) -> dict[str, float]:
    """Run wrk with a Lua `script` against `url`: requests/s, latency p50/p99, errors."""
    return wrk_results(
        wrk_process(url, script, seconds=seconds, connections=connections, threads=threads)
    )


@dataclass
class WrkRun:
    process: subprocess.Popen[str]
    script: Path


def wrk_process(
    url: str, script: str, *, seconds: int, connections: int, threads: int = 2
) -> WrkRun:
    """wrk started in the background (answers up to a minute long are waited for)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (make bench does it)")
    path = Path(tempfile.mkstemp(suffix=".lua")[1])
    path.write_text(script)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "60s",
        "--latency",
        "-s",
        str(path),
        url,
    ]
    return WrkRun(subprocess.Popen(command, stdout=subprocess.PIPE, text=True), path)


def wrk_results(run: WrkRun) -> dict[str, float]:
    """Wait for wrk: requests/s, latency p50/p99, answers other than 2xx and 3xx."""
    try:
        output, _ = run.process.communicate()
        if run.process.returncode != 0:
            raise RuntimeError(f"wrk failed ({run.process.returncode}): {output}")
    finally:
        run.script.unlink()
    requests = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests_per_s": round(requests, 1),
        "p50_ms": _latency_ms(output, "50") or 0.0,
        "p99_ms": _latency_ms(output, "99") or 0.0,
        "non_2xx": float(errors[1]) if errors else 0.0,
    }


def ingestion_script(path: str, batch: int) -> str:
    """Each request a new reading (or `batch` of them): unique device and timestamp."""
    base = int((datetime.now(UTC) - timedelta(days=10)).timestamp())
    return WRK_SCRIPT.format(base=base, batch=batch, path=path)


def http(svc: Services, *, batch: int, seconds: int, connections: int, runs: int) -> Result:
    scenario = "http-batch" if batch else "http-single"
    path = "/v1/ingestion/meter/batch" if batch else "/v1/ingestion/meter"
    result = Result(
        scenario, {"batch": batch, "seconds": seconds, "connections": connections, "path": path}
    )
    for run in range(runs):
        asyncio.run(reset(svc.dsn))
        daemon = Daemon(svc)
        daemon.start()
        cpu_before = daemon.cpu_s()
        started = time.perf_counter()
        box = BoxCpu()
        measured = wrk(
            daemon.url, ingestion_script(path, batch), seconds=seconds, connections=connections
        )
        measured["readings_per_s"] = measured["requests_per_s"] * max(1, batch)
        elapsed = time.perf_counter() - started
        measured["daemon_cpu_share"] = round((daemon.cpu_s() - cpu_before) / elapsed, 3)
        measured.update(box.measure())
        measured["peak_rss_mb"] = round(daemon.peak_rss_mb(), 1)
        measured["stored"] = accepted(daemon.metrics())
        daemon.stop()
        result.runs.append(measured)
        print(f"  run {run + 1}: {measured}", flush=True)
    return result
