"""The Bento's Python environment, derived from the project's one dependency list.

pyproject.toml is the source: the core dependencies and the ``train``, ``features`` and ``serve`` extras, plus the
packages installed with ``--no-deps`` (``[tool.unexrl] no-deps``: TorchRec, whose declared dependency is the CUDA
fbgemm-gpu wheel; ``fbgemm-gpu-cpu`` from the ``train`` extra provides the same module). The Bento declares the
closure of the rest as exact pins of the versions this build environment runs, and installs the no-deps packages
after them (serving/install-no-deps.sh): where the Bento runs, it runs what the tests ran against.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SERVING_EXTRAS = ("train", "features", "serve")
PROVIDED = {"fbgemm-gpu": "fbgemm-gpu-cpu"}
"""a dependency name -> the installed distribution that provides its module instead"""


def no_deps_requirements(pyproject: Path) -> list[str]:
    """``[tool.unexrl] no-deps`` of ``pyproject``: requirements installed without their declared dependencies."""
    return list(tomllib.loads(Path(pyproject).read_text())["tool"]["unexrl"]["no-deps"])


def serving_requirements(pyproject: Path, project: str = "unexrl") -> list[str]:
    """``name==version`` for every distribution the serving environment needs, sorted. Left out: the project
    itself (the Bento carries its sources) and the no-deps packages (installed after these, without resolving),
    whose own dependencies the project's extras declare."""
    roots = [Requirement(r) for r in metadata.requires(project) or []]
    wanted = [
        r for r in roots if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in SERVING_EXTRAS)
    ]
    no_deps = {canonicalize_name(Requirement(r).name) for r in no_deps_requirements(pyproject)}
    pins: dict[str, str] = {}
    queue = [*wanted, *(Requirement(r) for r in no_deps_requirements(pyproject))]
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(PROVIDED.get(canonicalize_name(requirement.name), requirement.name))
        if name in pins or name == canonicalize_name(project):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(
                f"{requirement}: not installed here, so its version cannot be pinned"
            ) from None
        if not requirement.specifier.contains(dist.version, prereleases=True):
            raise RuntimeError(f"{requirement}: the installed {name} is {dist.version}")
        if name in no_deps:
            pins[name] = ""
            continue
        pins[name] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            extras = set(requirement.extras)
            if (
                dep.marker is None
                or dep.marker.evaluate({"extra": ""})
                or any(dep.marker.evaluate({"extra": e}) for e in extras)
            ):
                queue.append(dep)
    return [f"{name}=={version}" for name, version in sorted(pins.items()) if version]
