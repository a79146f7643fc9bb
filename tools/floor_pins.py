"""Prints `name==floor` for each dependency of pyproject.toml that has a `>=` lower bound.

`make test-min` installs these pins, so the floors that pyproject states are the versions the
tests ran with. `--only a,b` limits the output to the named packages (the others then resolve
to their newest releases).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOOR = re.compile(r'^\s*"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?>=([0-9][^,"<;\s]*)')


def floor_pins(text: str) -> dict[str, str]:
    """The `>=` lower bound of every dependency line in the [project] dependencies array."""
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    pins = {}
    for line in block.splitlines():
        match = FLOOR.match(line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated package names")
    args = parser.parse_args()
    pins = floor_pins(PYPROJECT.read_text())
    wanted = [n.strip().lower() for n in args.only.split(",") if n.strip()]
    missing = [n for n in wanted if n not in pins]
    if missing:
        raise SystemExit(f"pyproject.toml: no '>=' floor for {', '.join(missing)}")
    for name in wanted or pins:
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
