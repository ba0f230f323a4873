"""What `pip install .` gives (the Dockerfile's install) must run without the test extras."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from daemon.services import free_port
from tests.services import REPO, wait_until

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins(lock: str) -> dict[str, str]:
    text = (REPO / lock).read_text()
    return {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9._-]+)==([^ \\]+)", text, re.MULTILINE)
    }


@pytest.mark.parametrize(
    ("lock", "groups"),
    [("requirements.lock", ["dependencies"]), ("requirements-test.lock", ["dependencies", "test"])],
)
def test_the_lock_files_pin_every_dependency_within_its_bounds(
    lock: str, groups: list[str]
) -> None:
    pinned = pins(lock)
    for group in groups:
        wanted = (
            PROJECT["dependencies"]
            if group == "dependencies"
            else PROJECT["optional-dependencies"][group]
        )
        for line in wanted:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in pinned, f"{lock} does not pin {name}: run make lock"
            assert requirement.specifier.contains(pinned[name]), (lock, line, pinned[name])


def test_what_is_installed_is_what_the_test_lock_pins() -> None:
    for name, version in pins("requirements-test.lock").items():
        assert metadata.version(name) == version, f"{name}: installed differs from the lock"


def test_the_daemon_runs_without_the_simulator() -> None:
    """`energy-ingest run` never imports the simulator and benchmark package."""
    code = "import sys, daemon.cli, daemon.app; assert 'simulator' not in sys.modules"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


SHIPPED = ["daemon", "broker", "api", "db", "simulator"]


def test_every_shipped_module_imports_without_the_test_extras() -> None:
    project = PROJECT

    def names(requirements: list[str]) -> set[str]:
        return {
            re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements
        }

    # (and the import names of test-only distributions that differ from theirs)
    blocked = names(project["optional-dependencies"]["test"]) | {"paho", "yaml"}
    blocked -= names(project["dependencies"])
    code = f"""
import importlib, pkgutil, sys
for name in {sorted(blocked)!r}:
    sys.modules[name] = None  # importing it now raises ImportError
for package in {SHIPPED!r}:
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if not module.name.endswith(".__main__"):
            importlib.import_module(module.name)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_file_the_pages_load_ships_with_the_package() -> None:
    """The dashboard and the API docs work offline only if the wheel carries their files:
    each file under api/static/ must be matched by a package-data pattern."""
    api = REPO / "api"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["api"]
    shipped = {path for pattern in patterns for path in glob.glob(pattern, root_dir=api)}
    present = {str(path.relative_to(api)) for path in (api / "static").rglob("*") if path.is_file()}
    assert present - shipped == set()
    page = (api / "static" / "dashboard" / "index.html").read_text()
    for asset in re.findall(r'(?:src|href)="/(static/[^"]+)"', page):
        assert asset in shipped, asset
    assert "static/uplot/LICENSE" in shipped


@pytest.mark.soak
def test_a_wheel_installed_elsewhere_runs_with_no_configuration(tmp_path: Path) -> None:
    """The wheel, installed (not editable) into a fresh virtual environment, runs
    `energy-ingest run` with nothing configured: its private PostgreSQL and Mosquitto start
    (the broker from the mosquitto.conf the wheel carries) and /health turns 200."""
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # Its dependencies from this environment (a .pth line adds the folder alone, not this
    # environment's editable install of the project): the project itself from the wheel.
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    (wheel,) = wheels.glob("*.whl")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing of it is within reach
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "MQTT_", "PYTHONPATH"))
    }
    env |= {"HTTP_PORT": str(port), "EMBEDDED_PG_PORT": "0", "EMBEDDED_MQTT_PORT": "0"}
    daemon = subprocess.Popen(
        [str(venv / "bin" / "energy-ingest"), "run"],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        health = wait_until(lambda: _health(port), timeout_s=90, interval_s=0.5)
        assert health["status"] == "ok", health
        where = subprocess.run(
            [str(python), "-c", "import daemon; print(daemon.__file__)"],
            capture_output=True,
            text=True,
            check=True,
            cwd=elsewhere,
        ).stdout
        assert str(site) in where, where  # the wheel's copy, not the checkout's
    finally:
        daemon.send_signal(signal.SIGTERM)
        output, _ = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, output[-3000:]


def _health(port: int) -> dict[str, Any] | None:
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    except httpx.HTTPError:
        return None
    body: dict[str, Any] = answer.json()
    return body if answer.status_code == 200 else None
