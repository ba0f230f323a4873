"""The private services of `make run` and the tests."""

from __future__ import annotations

import os
from pathlib import Path

from daemon.services import (
    EmbeddedMosquitto,
    EmbeddedPostgres,
    private_broker_config,
    shipped_mosquitto_conf,
)

DELIVERY_SETTINGS = (
    "persistence true",
    "max_queued_messages 0",
    "max_inflight_messages 0",
    "autosave_interval 10",
)


def test_private_broker_keeps_every_delivery_setting_of_the_shipped_one() -> None:
    conf = private_broker_config(
        shipped_mosquitto_conf().read_text(),
        port=1234,
        data=Path("/d"),
        log_file=Path("/l"),
        pid_file=Path("/p"),
        user="mosquitto",
    )
    lines = conf.splitlines()
    for setting in DELIVERY_SETTINGS:
        assert setting in lines
    assert "listener 1234 127.0.0.1" in lines and "listener 1883" not in lines
    assert "persistence_location /d/" in lines
    assert not any(line.startswith("password_file") for line in lines)


def test_shipped_broker_never_drops_queued_qos1_messages() -> None:
    lines = shipped_mosquitto_conf().read_text().splitlines()
    for setting in (*DELIVERY_SETTINGS, "allow_anonymous false"):
        assert setting in lines


def test_services_run_unprivileged_when_started_as_root(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto
) -> None:
    pids = _pids_of("postgres") + _pids_of("mosquitto")
    assert _pids_of("postgres") and _pids_of("mosquitto")
    for pid in pids:
        if os.geteuid() == 0:
            assert os.stat(f"/proc/{pid}").st_uid != 0
    assert postgres.data.exists() and mosquitto.conf.exists()


def _pids_of(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
