"""What `pip install .` gives (the Dockerfile's install) must run without the test extras."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from tests.services import REPO

SHIPPED = ["daemon", "broker", "api", "db"]


def test_every_shipped_module_imports_without_the_test_extras() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

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
