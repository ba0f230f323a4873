#!/usr/bin/env bash
# The drain benchmark with the daemon's own MQTT session and with aiomqtt 3, side by side:
# runs alternate (ours, aiomqtt 3, ours, ...) on the same machine in one go.
#   scripts/aiomqtt3/measure.sh [ROUNDS] [SCENARIO]     (default: 3 mqtt-drain)
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
for round in $(seq "$rounds"); do
    echo "== round $round: broker.subscriber"
    .venv/bin/energy-ingest bench "$scenario" --runs 1 | grep -E "readings_per_s|written"
    echo "== round $round: aiomqtt 3.0.0a1"
    BENCH_DAEMON_COMMAND="$venv/bin/python scripts/aiomqtt3/run_daemon.py run" \
        .venv/bin/energy-ingest bench "$scenario" --runs 1 | grep -E "readings_per_s|written"
done
