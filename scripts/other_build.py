"""A module of another checkout of this project, loaded beside this one's (for the A/B scripts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load(tree: Path, module: str) -> ModuleType:
    """`module` (dotted, e.g. "db.writes") as the checkout at `tree` has it, as `other_<name>`."""
    name = "other_" + module.rsplit(".", 1)[-1]
    path = tree.joinpath(*module.split(".")).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded
