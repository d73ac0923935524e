"""The package as a user gets it, outside its checkout, and the Bento in the environment it declares.

One fresh virtual environment (made once per session) holds exactly what the built Bento declares: its
``env/python/requirements.txt`` (pins derived from pyproject.toml, unexrl/serve/requirements.py) and then its image's
post commands (the ``--no-deps`` packages, serving/install-no-deps.sh), from the package index this machine reaches
(pip's cache keeps it cheap after the first build). In it:

- ``bentoml serve`` of the built Bento, with a trained actors artifact, run from that environment and outside the
  checkout (the Bento's own sources, no PYTHONPATH), answers /recommend with a page;
- the wheel built from this tree, installed without dependencies (the Bento's are the serving extras'), runs
  ``unexrl simulate``, ``cem``, ``evaluate`` and ``features init / build / materialize`` in an empty directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from unexrl.serve.local import bentoml_home, local_service
from unexrl.serve.package import BentoInfo, build_bento

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCES = (".git", ".venv", ".venv-checkov", "runs", "build", ".gpuwheels", "__pycache__", "*.egg-info")


def test_every_image_copies_what_the_package_bundles() -> None:
    """unexrl/bundled/ holds links into the tree; an image that builds the package without a link's target ships a
    package without those files (pip skips the dangling link), and fails only when they are first read."""
    targets = {
        link.readlink().as_posix().removeprefix("../../") + "/"
        for link in (ROOT / "unexrl" / "bundled").iterdir()
        if link.is_symlink()
    }
    assert "k8s/base/training/" in targets
    for dockerfile in sorted((ROOT / "dockerfiles").glob("*.Dockerfile")):
        copied = {line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")}
        assert targets <= copied, f"{dockerfile.name} does not copy {sorted(targets - copied)}"


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def _outside(venv: Path) -> dict[str, str]:
    """An environment in which only ``venv`` is on PATH and nothing points into the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                  "OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.fixture(scope="session")
def built_bento(
    tmp_path_factory: pytest.TempPathFactory, cem_artifact: Path, train_small: Callable[..., Path]
) -> tuple[BentoInfo, Path]:
    """A Bento around actors of its own (a bento's version is its model's: one model, one bento per store)."""
    os.environ.setdefault("BENTOML_HOME", str(tmp_path_factory.mktemp("bentoml")))
    import bentoml

    info = build_bento(
        train_small(tmp_path_factory.mktemp("bento-train") / "run", "unexrl-cic", cem_artifact)
    )
    return info, Path(bentoml.bentos.get(info.bento_tag).path)


@pytest.fixture(scope="session")
def bento_env(tmp_path_factory: pytest.TempPathFactory, built_bento: tuple[BentoInfo, Path]) -> Path:
    """A fresh venv with what the Bento declares: its requirements, then its image's post commands."""
    _, bento = built_bento
    venv = tmp_path_factory.mktemp("bento-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _outside(venv)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [*pip, "install", "-r", str(bento / "env" / "python" / "requirements.txt")], bento, env, timeout=1500
    )
    for command in yaml.safe_load((bento / "bento.yaml").read_text())["image"]["post_commands"]:
        _run(["bash", "-c", command], bento, env | {"BENTO_PATH": str(bento)})
    return venv


def test_the_bento_serves_a_page_from_the_environment_it_declares(
    built_bento: tuple[BentoInfo, Path], bento_env: Path, tmp_path: Path
) -> None:
    info, _ = built_bento
    # the environment has the serving stack and not this project: the Bento's own sources are what serves
    checks = "import torchrec, fbgemm_gpu, bentoml, feast; import importlib.util as u; print(u.find_spec('unexrl'))"
    assert (
        _run([str(bento_env / "bin" / "python"), "-c", checks], tmp_path, _outside(bento_env)).strip()
        == "None"
    )
    log = tmp_path / "service.log"
    env = {"BENTOML_HOME": bentoml_home(), "UNEXRL_FEATURE_REPO": str(tmp_path / "no-feature-store")}
    with local_service(
        info.model_tag, target=info.bento_tag, env=env, log_file=log, python_env=bento_env
    ) as service:
        page = httpx.post(
            f"{service.url}/recommend", json={"user_id": 7}, headers=service.headers, timeout=30.0
        )
        version = httpx.post(f"{service.url}/version", json={}, timeout=30.0)
    assert page.status_code == 200, page.text
    assert len(page.json()["items"]) > 0
    assert version.json()["model_version"] == info.model_version


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory, bento_env: Path) -> Path:
    """The wheel of this tree (built from a copy of it) installed into the Bento's environment."""
    source = tmp_path_factory.mktemp("source") / "unexrl"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    dist = tmp_path_factory.mktemp("dist")
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        ".",
    ]
    _run(build, source, dict(os.environ))
    (wheel,) = dist.glob("unexrl-*.whl")
    pip = [str(bento_env / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "install", "--no-deps", str(wheel)], dist, _outside(bento_env))
    return bento_env


def test_the_installed_package_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    env = _outside(installed)
    unexrl = str(installed / "bin" / "unexrl")
    where = _run(
        [str(installed / "bin" / "python"), "-c", "import unexrl; print(unexrl.__file__)"], tmp_path, env
    )
    assert where.startswith(str(installed)) and str(ROOT) not in where
    small = ["--config", "small", "--set", "cem.iterations=2", "--set", "cem.population=4"]
    _run([unexrl, "cem", *small, "--set", "cem.sessions_per_candidate=4", "--out", "cem"], tmp_path, env)
    _run(
        [unexrl, "simulate", *small, "--set", "logging.sessions=24", "--policy", "cem", "--out", "logs"],
        tmp_path,
        env,
    )
    report = _run(
        [unexrl, "evaluate", *small, "--set", "evaluation.sessions_per_seed=16", "--no-references",
         "--policy", "tuned=cem", "--json", "evaluation.json"],
        tmp_path, env,
    )  # fmt: skip
    assert (tmp_path / "evaluation.json").is_file(), report
    _run([unexrl, "features", "init", "--config", "small"], tmp_path, env)
    _run(
        [unexrl, "features", "build", "--config", "small", "--logs", "logs", "--out", "features"],
        tmp_path,
        env,
    )
    _run([unexrl, "features", "materialize", "--config", "small", "--features", "features"], tmp_path, env)
    assert (tmp_path / "feature_repo" / "definitions.py").is_file()
    assert (tmp_path / "feature_repo" / "data" / "online_store.db").is_file()


def test_materialize_without_a_repository_says_how_to_make_one(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(installed / "bin" / "unexrl"), "features", "materialize", "--config", "small", "--features", "x"],
        cwd=tmp_path, env=_outside(installed), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "`unexrl features init` creates one" in done.stderr
