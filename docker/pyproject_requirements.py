"""Print the project's dependencies from pyproject.toml as a requirements file.

Used by the Dockerfiles so the image installs exactly the versions pinned in
pyproject (the dependency layer is built before the source is copied, so source
edits do not reinstall torch). Fails when a dependency is not pinned with ``==``.

    python pyproject_requirements.py pyproject.toml [--extra NAME ...]
"""
from __future__ import annotations

import re
import sys
import tomllib

PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!-]+(\s*;.*)?$")


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{pyproject} has no optional dependency group {extra!r}")
        reqs += optional[extra]
    loose = [r for r in reqs if not PINNED.match(r.strip())]
    if loose:
        raise SystemExit(f"not pinned with ==: {', '.join(loose)}")
    return reqs


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    path, rest, extras = argv[0], argv[1:], []
    while rest:
        flag = rest.pop(0)
        if flag != "--extra" or not rest:
            raise SystemExit(f"unexpected argument {flag!r}\n{__doc__}")
        extras.append(rest.pop(0))
    print("\n".join(requirements(path, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
