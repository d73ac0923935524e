"""Run the BentoML service as a child process on loopback: for tests, `unexrl bench serve` and local use.

``bentoml serve`` starts a supervisor with worker processes; it is started in its own process group and that
group is stopped (SIGTERM, then SIGKILL) when the context exits, so no worker outlives the caller. Each service
gets its own API token (``UNEXRL_API_TOKEN``), which the yielded endpoint carries for its clients, and its own
BENTOML_HOME whose models/ and bentos/ are this process's store: ``bentoml serve`` empties its home's Prometheus
multiprocess directory when it starts, so two services sharing one home (two replicas) would erase each other's
metrics.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from unexrl.config import Config
from unexrl.loopback import free_port, stop, wait_http_ready
from unexrl.serve.gateway import ENV_TOKEN, bearer
from unexrl.serve.package import ENV_MODEL, PROJECT_ROOT
from unexrl.serve.sessions import ENV_REDIS, ENV_SESSION_STORE

SERVICE = "serving.service:Recommendation"


def bentoml_home() -> str:
    """The BentoML home this process uses (BENTOML_HOME is read once, at first use)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


@dataclass(frozen=True)
class Endpoint:
    """A running service: its base URL and the token its API routes require."""

    url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


@contextmanager
def local_service(
    model_tag: str,
    *,
    target: str = SERVICE,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
    start_timeout_s: float = 120.0,
    python_env: Path | None = None,
) -> Iterator[Endpoint]:
    """Yield the endpoint (``http://127.0.0.1:PORT`` and its token) of ``bentoml serve target`` serving
    ``model_tag``; ``target`` may also be a bento tag. Raises RuntimeError (with the log's tail) if it exits or
    is not ready in time. ``env`` may set the token itself (``UNEXRL_API_TOKEN``).

    ``python_env``: serve a built bento with that virtual environment's bentoml, from outside this checkout (no
    PYTHONPATH to it): the bento's own sources and that environment's packages only. Default: this environment,
    with the checkout's sources importable (serving ``serving.service`` from the tree).
    """
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="unexrl-service-home-"))
    for store in ("models", "bentos"):
        (Path(bentoml_home()) / store).mkdir(parents=True, exist_ok=True)
        (home / store).symlink_to(Path(bentoml_home()) / store, target_is_directory=True)
    child_env = {**os.environ, "BENTOML_HOME": str(home), ENV_MODEL: model_tag, "OMP_NUM_THREADS": "1"}
    if python_env is None:
        child_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
        )
        exe, cwd = Path(sys.executable).with_name("bentoml"), PROJECT_ROOT
    else:
        child_env.pop("PYTHONPATH", None)
        child_env["VIRTUAL_ENV"] = str(python_env)
        child_env["PATH"] = os.pathsep.join([str(python_env / "bin"), child_env.get("PATH", "")])
        exe, cwd = python_env / "bin" / "bentoml", python_env
    child_env[ENV_TOKEN] = secrets.token_urlsafe(32)
    child_env.update(env or {})
    log = open(log_file, "wb") if log_file is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(exe), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env=child_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_http_ready(proc, f"{url}/readyz", start_timeout_s, interval_s=0.25):
            tail = Path(log_file).read_text(errors="replace")[-3000:] if log_file is not None else ""
            raise RuntimeError(f"the service did not become ready on {url} (exit code {proc.poll()})\n{tail}")
        yield Endpoint(url, child_env[ENV_TOKEN])
    finally:
        stop(proc, 15.0, group=True)
        if log_file is not None:
            log.close()  # type: ignore[union-attr]
        shutil.rmtree(home, ignore_errors=True)


def live_feature_env(cfg: Config, root: Path, redis: str, logs: Path | None = None) -> dict[str, str]:
    """Build ``logs``' features (default: a fresh random-policy log of ``cfg``) and materialise them into the Redis
    at ``redis`` as the pipeline's features and materialise steps do (a repository of its own under ``root``, its
    registry published beside it); the environment of a service that reads its user features from that store
    through the published registry and keeps its sessions on the same Redis (what a replica in a cluster gets: the
    ``serving`` Feast environment, over the service's own copy of the definitions)."""
    from unexrl.environ import environ
    from unexrl.features import store
    from unexrl.features.build import build_features
    from unexrl.features.published import ENV_FEAST_REGISTRY
    from unexrl.policies.weights import RandomPolicy
    from unexrl.sim.env import Simulator
    from unexrl.simulate import simulate_logs

    repo = store.init_repo(root / "feature_store")
    live = cfg.model_copy(
        update={"features": cfg.features.model_copy(update={"environment": "redis", "repo": str(repo)})}
    )
    if logs is None:
        policy = RandomPolicy(cfg.cascade, seed=0)
        logs = simulate_logs(Simulator(cfg), policy, {"kind": "random"}, root / "logs", cfg.seeds.train[0])
    build_features(logs, root / "features", live)
    with environ({ENV_REDIS: redis}):
        store.materialize(live, root / "features")
        published = store.publish_registry(live, root / "feast" / "registry.db")
    return {
        store.ENV_ENVIRONMENT: "serving",
        ENV_FEAST_REGISTRY: str(published),
        ENV_REDIS: redis,
        ENV_SESSION_STORE: "redis",
    }
