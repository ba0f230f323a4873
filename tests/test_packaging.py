"""What `pip install .` gives (the Dockerfile's install) must run without the test extras."""

from __future__ import annotations

import glob
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.services import REPO

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
