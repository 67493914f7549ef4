"""The project's declared requirements (setup.cfg), for `make test-latest`.

    python .ci/requirements.py --unpinned [--extra test]   names only, one per line: install the newest releases
    python .ci/requirements.py --report [--extra test]     installed version of every requirement, and whether it
                                                           lies inside the declared range
"""

import argparse
import configparser
import pathlib
import re
import sys
from importlib import metadata


SETUP_CFG = pathlib.Path(__file__).resolve().parent.parent / "setup.cfg"
NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$")


def requirements(extras: list[str]) -> list[tuple[str, str]]:
    """`(name, specifier)` of `install_requires` and the named extras."""
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"][extra].splitlines()
    return [NAME.match(line).groups() for line in lines if line.strip()]


def inside(version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(specifier).contains(version, prereleases=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unpinned", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--extra", action="append", default=[])
    args = parser.parse_args()
    if args.unpinned:
        print(" ".join(name for name, _ in requirements(args.extra) if name != "torch"))
        return
    if args.report:
        outside = []
        for name, specifier in requirements(args.extra):
            version = metadata.version(name)
            ok = inside(version, specifier)
            outside += [] if ok else [name]
            print(f"{name:20s} {version:12s} declared {specifier:16s} {'' if ok else 'NEWER THAN DECLARED'}")
        if outside:
            print(f"outside the declared window: {', '.join(outside)}", file=sys.stderr)


if __name__ == "__main__":
    main()
