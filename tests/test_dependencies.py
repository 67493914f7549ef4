"""The dependency window is tested, not hoped for: setup.cfg's ranges, the locked install (constraints/locked.txt) and
the lowest declared versions (constraints/lowest.txt) agree with each other and with the Makefile."""

import configparser
import re

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO_ROOT


FAST_MOVING = ("transformers", "diffusers", "trl", "peft", "accelerate", "datasets", "huggingface-hub", "bitsandbytes")
"""The libraries whose releases break APIs every few weeks: each has an upper bound and a tested lowest version."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, SpecifierSet]:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines() + config["options.extras_require"]["test"].splitlines()
    requirements = [Requirement(line) for line in lines if line.strip()]
    return {normalize(requirement.name): requirement.specifier for requirement in requirements}


def pinned(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            package, version = line.split("==")
            pins[normalize(package)] = version.strip()
    return pins


@pytest.mark.parametrize("constraints", ["locked.txt", "lowest.txt"])
def test_every_requirement_is_pinned_inside_its_declared_range(constraints):
    pins = pinned(constraints)
    for name, specifier in declared().items():
        assert name in pins, f"{constraints} has no pin for {name}"
        assert specifier.contains(pins[name]), f"{constraints}: {name}=={pins[name]} is outside {specifier}"


def test_fast_moving_libraries_have_an_upper_bound_and_a_tested_lowest_version():
    ranges, lowest = declared(), pinned("lowest.txt")
    for name in FAST_MOVING:
        bounds = {spec.operator: spec.version for spec in ranges[name]}
        assert "<" in bounds and ">=" in bounds, f"{name} needs a lower and an upper bound, got {ranges[name]}"
        floor = bounds[">="].split(".")
        assert lowest[name].split(".")[: len(floor)] == floor, f"lowest.txt tests {name} {lowest[name]}, not {bounds['>=']}"


def test_the_set_up_commands_install_the_locked_set():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert '-c constraints/locked.txt -e ".[test]"' in makefile
    assert '-c constraints/lowest.txt -e ".[test]"' in makefile
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test-lowest" in ci
