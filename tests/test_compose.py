"""docker-compose.yml, checked without a Docker engine: every file, port and variable it
names exists, and the daemon settings it passes are real settings."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import yaml

from daemon.provision import Role, read_acl, role_of
from ingest.config import Settings
from tests.services import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DAEMONS = [name for name, s in SERVICES.items() if s.get("build") and not s.get("command")]
ONE_SHOT = [name for name, s in SERVICES.items() if s.get("restart") == "no"]


def test_two_daemon_replicas_share_one_subscription_group() -> None:
    assert DAEMONS == ["ingest-1", "ingest-2"]
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
    for name in [*DAEMONS, *ONE_SHOT]:
        assert set(SERVICES[name]["environment"]) <= known


def _published(service: str) -> list[tuple[int, int]]:
    pairs = []
    for port in SERVICES[service].get("ports", []):
        host, container = str(port).split(":")[-2:]  # [address:]host:container
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


def test_every_long_running_service_is_checked_restarted_and_given_time_to_stop() -> None:
    assert ONE_SHOT == ["migrate"]
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            continue
        assert service.get("healthcheck", {}).get("test"), name
        assert service.get("restart") == "unless-stopped", name
        assert service.get("stop_grace_period"), name


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return float(match[1])


def test_daemons_stop_within_their_grace_period() -> None:
    for name in DAEMONS:
        service = SERVICES[name]
        deadline = float(service["environment"]["SHUTDOWN_TIMEOUT_S"])
        assert deadline + 3 <= _seconds(service["stop_grace_period"]), name
        assert deadline < Settings.model_fields["shutdown_timeout_s"].default + 5


def test_daemons_wait_for_the_migrations_and_healthy_neighbours() -> None:
    migrate = SERVICES["migrate"]
    assert migrate["command"] == ["energy-ingest", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in DAEMONS:
        needs = SERVICES[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["postgres"]["condition"] == "service_healthy"
        assert needs["mosquitto"]["condition"] == "service_healthy"


def test_each_replica_is_a_broker_user_of_its_own_provisioned_as_a_daemon() -> None:
    acl = read_acl(REPO / "deploy" / "mosquitto" / "acl")
    example = (REPO / ".env.example").read_text()
    users = []
    for name in DAEMONS:
        env = SERVICES[name]["environment"]
        url = urlsplit(env["MQTT_URL"])
        assert url.username == env["MQTT_CLIENT_ID"], name  # the broker makes them equal
        assert role_of(url.username, acl.get(url.username, ["-"])) == Role.DAEMON, name
        password = re.fullmatch(r"\$\{([A-Z0-9_]+)\}", url.password or "")
        assert password and f"\n{password[1]}=" in example, name
        users.append(url.username)
    assert len(set(users)) == len(users)


def test_the_brokers_health_check_logs_in_as_a_probe_that_may_do_nothing_else() -> None:
    broker = SERVICES["mosquitto"]
    check = " ".join(broker["healthcheck"]["test"])
    user = re.search(r"-u (\S+)", check)
    assert (
        user
        and role_of(user[1], read_acl(REPO / "deploy" / "mosquitto" / "acl").get(user[1], ["-"]))
        == Role.PROBE
    )
    for variable in re.findall(r"\$\$([A-Z_]+)", check):
        assert variable in broker["environment"], variable


def test_images_name_a_version() -> None:
    for name, service in SERVICES.items():
        if "image" in service:
            assert re.fullmatch(r"[a-z0-9./-]+:v?[0-9][0-9.]*", service["image"]), name
