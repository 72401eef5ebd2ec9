# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The repository's habits: a licence header on every Python file, every third-party package
the library imports declared, and test modules that import helpers, not each other."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADER = [
    "# Copyright (C) 2026 the mergekit-moe2dense authors",
    "# SPDX-License-Identifier: LGPL-3.0-only",
]
FIRST_PARTY = {"mergekit_moe2dense", "mergekit_moe2dense_hook", "benchmarks"}
# Not ours and not in the repository's history: virtual environments, caches, build outputs.
SKIPPED_DIRS = {"__pycache__", "build", "dist", "node_modules"}


def python_files() -> list[Path]:
    def skipped(path: Path) -> bool:
        parts = path.relative_to(REPO).parts[:-1]
        return any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts)

    return sorted(p for p in REPO.rglob("*.py") if not skipped(p))


def top_level_imports(path: Path) -> set[str]:
    """Absolute imports of `path`, also those inside functions (lazy imports are imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


# Distributions whose import name is not their name with dashes as underscores
IMPORT_NAMES = {"scikit-learn": "sklearn", "pyyaml": "yaml"}


def import_name(requirement: str) -> str:
    """The top-level module a requirement such as `scikit-learn>=1.4` provides, whether or not it is installed."""
    distribution = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()
    return IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))


def declared_imports() -> set[str]:
    """The import names of pyproject's dependencies and of every optional extra (lm-eval for
    eval --tasks: an optional feature's imports are declared there)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [req for reqs in project.get("optional-dependencies", {}).values() for req in reqs]
    return {import_name(req) for req in project["dependencies"] + extras}


def test_every_python_file_starts_with_the_licence_header():
    files = python_files()
    # the walk reaches every part of the repository that holds Python
    assert {p.relative_to(REPO).parts[0] for p in files} >= {"mergekit_moe2dense", "plugin", "tests", "benchmarks"}
    missing = [str(p.relative_to(REPO)) for p in files if p.read_text(encoding="utf-8").splitlines()[:2] != HEADER]
    assert not missing, f"no licence header: {missing}"


def test_every_imported_third_party_package_is_declared():
    imported = set()
    for root in ("mergekit_moe2dense", "plugin"):
        for path in (REPO / root).rglob("*.py"):
            imported |= top_level_imports(path)
    third_party = imported - FIRST_PARTY - set(sys.stdlib_module_names)
    assert {"torch", "sklearn", "yaml", "lm_eval"} <= third_party  # the scan sees imports, lazy ones too
    undeclared = sorted(third_party - declared_imports())
    assert not undeclared, f"imported but not in pyproject's dependencies or extras: {undeclared}"


def test_test_modules_import_helpers_not_conftest_or_each_other():
    offenders = {
        path.name: sorted(n for n in top_level_imports(path) if n == "conftest" or n.startswith("test_"))
        for path in sorted((REPO / "tests").glob("*.py"))
    }
    assert not {name: found for name, found in offenders.items() if found}, (
        "import shared test code from helpers.py (fixtures come from conftest.py by name)"
    )
