"""The monitoring shipped with the daemon, checked without a Docker engine: the alerting rules
pass promtool (their syntax and their unit tests), the compose profile mounts what exists and
scrapes every replica, and every metric a rule or a dashboard panel queries is one the daemon
exports, documented in the README."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from db.probe import DatabaseProbe, DatabaseStatus
from ingest.metrics import Metrics
from tests.services import REPO
from tests.test_compose import DAEMONS, SERVICES

PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
RULES: dict[str, Any] = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
ALERTS: list[dict[str, Any]] = [rule for group in RULES["groups"] for rule in group["rules"]]
UNIT_TESTS: dict[str, Any] = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
METRIC = re.compile(r"\benergy_ingest_[a-z0-9_]+")
# How prometheus_client exposes a family's samples, for labelled families with no child yet.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "no promtool: `make test` installs it (Debian's prometheus package)"
    return subprocess.run(
        [path, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    cases: dict[str, list[list[Any]]] = {}
    for test in UNIT_TESTS["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    for alert in ALERTS:
        expected = cases.get(alert["alert"], [])
        assert any(expected), f"{alert['alert']}: no case where it fires"
        assert not all(expected), f"{alert['alert']}: no case where it does not fire"


@pytest.mark.parametrize("name", [alert["alert"] for alert in ALERTS])
def test_the_unit_tests_fail_without_the_rule(tmp_path: Path, name: str) -> None:
    """The unit tests can fail: with one rule gone, its case that fires fails."""
    rules = json.loads(json.dumps(RULES))
    for group in rules["groups"]:
        group["rules"] = [rule for rule in group["rules"] if rule["alert"] != name]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(PROMETHEUS / "alerts.test.yml", tmp_path)
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert f"alertname: {name}," in result.stdout + result.stderr


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_says_what_it_means_how_bad_and_where_its_runbook_is() -> None:
    readme = (REPO / "README.md").read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", readme, flags=re.MULTILINE)}
    names = [alert["alert"] for alert in ALERTS]
    assert len(set(names)) == len(names)
    for alert in ALERTS:
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        page, anchor = annotations["runbook"].split("#")
        assert page == "README.md" and anchor in anchors, alert["alert"]
        assert anchor == alert["alert"].lower(), alert["alert"]


def exported_metrics() -> tuple[set[str], set[str]]:
    """The families of a daemon's registry, and the names of the samples they expose."""
    metrics = Metrics()
    metrics.watch_http(SimpleNamespace(open=set(), evicted=0, timed_out=0))  # at start
    metrics.watch_replica(lambda: None)  # (declared, with no sample, without a replica)
    families, samples = set(), set()
    for family in metrics.registry.collect():
        families.add(family.name)
        samples |= {sample.name for sample in family.samples}
        if not family.samples:
            samples |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return families, samples


def queried_metrics() -> dict[str, set[str]]:
    """Every `energy_ingest_…` name in a rule's or a panel's expression, by where."""
    queried: dict[str, set[str]] = {}
    for alert in ALERTS:
        queried.setdefault("alerts.yml", set()).update(METRIC.findall(alert["expr"]))
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                queried.setdefault(path.name, set()).update(METRIC.findall(target["expr"]))
    return queried


def test_every_metric_queried_is_one_the_daemon_exports() -> None:
    _, samples = exported_metrics()
    queried = queried_metrics()
    assert set(queried) == {"alerts.yml", *(path.name for path in DASHBOARDS)}
    for where, names in queried.items():
        assert names and names <= samples, (where, names - samples)


def test_every_exported_metric_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    families, _ = exported_metrics()
    documented = set(METRIC.findall(readme))
    missing = {
        name for name in families if name not in documented and f"{name}_total" not in documented
    }
    assert not missing


def test_the_dashboard_shows_what_operators_watch() -> None:
    (dashboard,) = DASHBOARDS
    exprs = " ".join(
        target["expr"]
        for panel in json.loads(dashboard.read_text())["panels"]
        for target in panel["targets"]
    )
    for needed in (
        "by (transport)",
        "energy_ingest_lag_seconds_bucket",
        "energy_ingest_buffer_depth",
        "energy_ingest_flush_seconds_bucket",
        'outcome="rejected"',
        "energy_ingest_silent_devices",
        "energy_ingest_vehicles_below_efficiency",
    ):
        assert needed in exprs, needed


# -- the compose profile ------------------------------------------------------------------

MONITORING = [name for name, service in SERVICES.items() if service.get("profiles")]


def _mounts(service: str) -> dict[str, Path]:
    """Container path -> the repository's file or folder mounted there."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = REPO / source
    return mounts


def test_monitoring_is_only_in_its_profile() -> None:
    assert MONITORING == ["prometheus", "grafana"]
    for name in MONITORING:
        assert SERVICES[name]["profiles"] == ["monitoring"]
    for name, service in SERVICES.items():
        if name not in MONITORING:
            assert not set(service.get("depends_on", {})) & set(MONITORING), name


def test_prometheus_scrapes_every_replica_with_the_rules_loaded() -> None:
    prometheus = SERVICES["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"])
    mounts = _mounts("prometheus")
    config_path = mounts[flags["--config.file"]]
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        target = str(Path(flags["--config.file"]).parent / rule_file)
        assert mounts[target] == PROMETHEUS / rule_file
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    ports = {SERVICES[d]["environment"]["HTTP_PORT"] for d in DAEMONS}
    assert static["targets"] == [f"{d}:{port}" for d in DAEMONS for port in ports]
    assert job["job_name"] == "energy-ingest"
    assert {'job="energy-ingest"' in a["expr"] for a in ALERTS if "up{" in a["expr"]} <= {True}
    result = promtool("check", "config", str(config_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_reads_prometheus_and_the_dashboards_of_the_repository() -> None:
    mounts = _mounts("grafana")
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus"
    published = [str(port).split(":")[-1] for port in SERVICES["prometheus"]["ports"]]
    assert str(url.port) in published
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "energy-ingest.yml").read_text())[
        "providers"
    ]
    folder = mounts[provider["options"]["path"]]
    assert sorted(folder.glob("*.json")) == DASHBOARDS and DASHBOARDS
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert panel["targets"], panel["title"]
    password = SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password == "${GRAFANA_ADMIN_PASSWORD}"


def replica_samples(status: DatabaseStatus | None) -> dict[str, float]:
    metrics = Metrics()
    metrics.watch_replica(lambda: status)
    return {
        sample.name: sample.value
        for family in metrics.registry.collect()
        if family.name.startswith("energy_ingest_replica_")
        for sample in family.samples
    }


@given(
    state=st.sampled_from(["up", "busy", "down", "read-only"]),
    lag=st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False),
)
def test_the_replica_is_exported_as_its_probe_last_found_it(state: str, lag: float | None) -> None:
    assert replica_samples(None) == {}  # reads go to the primary: no sample, no alert
    samples = replica_samples(DatabaseStatus(state, "", lag))
    up = state in ("up", "busy")
    assert samples["energy_ingest_replica_up"] == (1.0 if up else 0.0)
    if up and lag is not None:
        assert samples["energy_ingest_replica_lag_seconds"] == lag
    else:
        assert "energy_ingest_replica_lag_seconds" not in samples


def test_a_replica_behind_before_it_replayed_anything_counts_its_lag_from_when_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh replica has no replayed transaction to date its lag by; behind, its lag is at
    least how long the probe has seen it so, and the alert can fire."""
    probe = DatabaseProbe("postgresql://unused", schema="public", pooler="session", replica=True)
    clock = iter([100.0, 107.5, 300.0])
    monkeypatch.setattr("db.probe.time.monotonic", lambda: next(clock))

    def judged(lag_s: float | None, behind: bool) -> float | None:
        row = {"lag_s": lag_s, "behind": behind, "receiving": "streaming"}
        return probe._judge(row).lag_s

    assert judged(None, True) == 0.0
    assert judged(None, True) == 7.5
    assert judged(0.0, False) == 0.0  # caught up: the count starts again
    assert judged(None, True) == 0.0
    assert judged(42.0, True) == 42.0  # dated by its replayed transactions
