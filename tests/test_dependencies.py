"""The dependency window is tested, not hoped for: setup.cfg's ranges, the locked install (constraints/locked.txt) and
the lowest declared versions (constraints/lowest.txt) agree with each other and with the Makefile."""

import configparser
import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO_ROOT


FAST_MOVING = ("transformers", "diffusers", "trl", "peft", "accelerate", "datasets", "huggingface-hub", "bitsandbytes")
"""The libraries whose releases break APIs every few weeks: each has an upper bound and a tested lowest version."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: tuple[str, ...] = ("test",)) -> dict[str, SpecifierSet]:
    """`{name: specifier}` of `install_requires` and the named extras of setup.cfg."""
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"][extra].splitlines()
    requirements = [Requirement(line) for line in lines if line.strip()]
    return {normalize(requirement.name): requirement.specifier for requirement in requirements}


def pinned(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            package, version = line.split("==")
            pins[normalize(package)] = version.strip()
    return pins


@pytest.mark.parametrize(("constraints", "extras"), [("locked.txt", ("test", "browser")), ("lowest.txt", ("test",))])
def test_every_requirement_is_pinned_inside_its_declared_range(constraints, extras):
    pins = pinned(constraints)
    for name, specifier in declared(extras).items():
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
    assert '-c constraints/locked.txt -e ".[test,browser]"' in makefile
    assert '-c constraints/lowest.txt -e ".[test]"' in makefile
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test-browser" in ci and "make test-lowest" in ci


@pytest.mark.parametrize(("target", "install"), [
    (".venv/.installed", '.venv/bin/python -m pip install --quiet -c constraints/locked.txt -e ".[test,browser]"'),
    (".venv-lowest/.installed", '.venv-lowest/bin/python -m pip install --quiet -c constraints/lowest.txt -e ".[test]"'),
])
def test_make_expands_the_install_command_whole(target, install):
    """What make would run (`make -n -B`), not what the Makefile's text holds: a comma written inside `$(call ...)`
    splits the argument and leaves an unterminated quote."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed: the README's set-up commands need it")
    commands = subprocess.run(["make", "-n", "-B", target], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert install in commands.splitlines()
