#!/usr/bin/env bash
# The drain benchmark with the daemon's own MQTT session and with aiomqtt 3, side by side:
# runs alternate on this machine in one go (BENCHMARKS.md, "The MQTT link").
#   scripts/aiomqtt3/measure.sh [ROUNDS] [SCENARIO]     (default: 3 mqtt-drain)
# BEFORE_VENV=/path/venv adds a third build to each round: an earlier commit of the project,
# installed (pip install -e) in that venv, run from its own checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
scenario=${2:-mqtt-drain}
venv=.venv-aiomqtt3
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -e .
    # aiomqtt 3.0.0a1 declares mqtt5~=0.5.0, which has no wheel here: 0.6.0 has its API.
    "$venv/bin/pip" install -q --no-deps "aiomqtt==3.0.0a1" "mqtt5==0.6.0"
fi
run() {
    echo "== $scenario, round $round: $1"
    shift
    "$@" bench "$scenario" --runs 1 | grep -E "^  run|written"
}
for round in $(seq "$rounds"); do
    if [ -n "${BEFORE_VENV:-}" ]; then
        run "before" "$BEFORE_VENV/bin/energy-ingest"
    fi
    run "broker.subscriber" .venv/bin/energy-ingest
    BENCH_DAEMON_COMMAND="$venv/bin/python scripts/aiomqtt3/run_daemon.py run" \
        run "aiomqtt 3.0.0a1" .venv/bin/energy-ingest
done
