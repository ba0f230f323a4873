#!/usr/bin/env bash
# Installs what `make run` / `make test` need from the system and cannot get from PyPI:
# PostgreSQL server binaries and Mosquitto (plus its clients, for trying things by hand);
# for `make test` also PgBouncer, Chromium and Prometheus (its promtool), for `make bench` wrk.
# Skips what is present, and what DATABASE_URL / MQTT_URL make unnecessary.
set -euo pipefail

need=()
have_postgres() {
    command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if [ -z "${DATABASE_URL:-}" ] && ! have_postgres; then
    need+=(postgresql)
fi
if [ -z "${MQTT_URL:-}" ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    need+=(mosquitto)
fi
if ! command -v mosquitto_pub >/dev/null 2>&1; then
    need+=(mosquitto-clients)
fi
# `make test` also needs PgBouncer (the transaction-pooler tests).
if [ "${TESTS:-}" = 1 ] && ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    need+=(pgbouncer)
fi
# ... and Chromium (the dashboard's browser test drives it headless).
if [ "${TESTS:-}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    need+=(chromium)
fi
# ... and promtool (Debian's prometheus package), which checks and tests the alerting rules.
if [ "${TESTS:-}" = 1 ] && ! command -v promtool >/dev/null 2>&1; then
    need+=(prometheus)
fi
# `make bench` also needs wrk, the HTTP load generator.
if [ "${BENCH:-}" = 1 ] && ! command -v wrk >/dev/null 2>&1; then
    need+=(wrk)
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "Missing system packages: ${need[*]}" >&2
    echo "Install them with:  sudo apt-get install ${need[*]}" >&2
    echo "or point DATABASE_URL / MQTT_URL at servers you already run." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "Missing: ${need[*]} (no apt-get here: install them with your package manager," >&2
    echo "or point DATABASE_URL / MQTT_URL at servers you already run)." >&2
    exit 1
fi
echo "Installing ${need[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q >/dev/null
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
