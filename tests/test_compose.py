"""docker-compose.yml, checked without a Docker engine: every file, port and variable it
names exists, and the daemon settings it passes are real settings."""

from __future__ import annotations

import re
from typing import Any

import yaml

from daemon.config import Settings
from tests.services import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DAEMONS = [name for name, s in SERVICES.items() if s.get("build")]


def test_two_daemon_replicas_share_one_subscription_group() -> None:
    assert len(DAEMONS) == 2
    envs = [SERVICES[name]["environment"] for name in DAEMONS]
    assert {env["MQTT_SHARED_GROUP"] for env in envs} == {"ingest"}
    assert len({env["MQTT_CLIENT_ID"] for env in envs}) == 2


def test_every_mounted_or_built_file_exists() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), (name, source)
        if service.get("build"):
            assert (REPO / service["build"] / "Dockerfile").exists()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source


def test_every_variable_is_in_env_example() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    example = (REPO / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_]+)=", example, flags=re.MULTILINE))
    used = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    assert used and used <= defined, used - defined


def test_daemon_environment_names_real_settings() -> None:
    known = {name.upper() for name in Settings.model_fields}
    for name in DAEMONS:
        assert set(SERVICES[name]["environment"]) <= known


def _published(service: str) -> list[tuple[int, int]]:
    pairs = []
    for port in SERVICES[service]["ports"]:
        host, container = str(port).split(":")
        pairs.append((int(host), int(container)))
    return pairs


def test_ports_match_what_each_service_listens_on() -> None:
    conf = (REPO / "mosquitto.conf").read_text()
    listeners = [int(m) for m in re.findall(r"^listener (\d+)", conf, flags=re.MULTILINE)]
    assert [c for _, c in _published("mosquitto")] == listeners
    assert [c for _, c in _published("postgres")] == [5432]
    for name in DAEMONS:
        http_port = int(SERVICES[name]["environment"]["HTTP_PORT"])
        assert [c for _, c in _published(name)] == [http_port]
    hosts = [h for name in SERVICES for h, _ in _published(name)]
    assert len(hosts) == len(set(hosts))


def test_broker_files_are_where_mosquitto_conf_expects_them() -> None:
    conf = (REPO / "mosquitto.conf").read_text()
    mounted = {v.split(":")[1] for v in SERVICES["mosquitto"]["volumes"]}
    for key in ("password_file", "acl_file"):
        match = re.search(rf"^{key} (\S+)", conf, flags=re.MULTILINE)
        assert match and match[1] in mounted, key
    persistence = re.search(r"^persistence_location (\S+)", conf, flags=re.MULTILINE)
    assert persistence and any(persistence[1].rstrip("/") == m.rstrip("/") for m in mounted)


def test_build_context_leaves_out_local_state() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)
