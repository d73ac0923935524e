"""The UNEX-RL recommendation service: a thin BentoML shell over unexrl.serve.engine (docs/serving.md).

Environment:
  UNEXRL_MODEL          model store tag of the served policy (default unexrl-policy:latest; pinned in a bento)
  UNEXRL_SHADOW_MODEL   optional model store tag of a shadow policy: its actions become metrics, never pages
  UNEXRL_ROLE           role label of the served model's metrics: stable (default) or canary
  UNEXRL_FEATURE_ENV    feature store environment (features.environment: local, redis, production, serving)
  UNEXRL_FEAST_REGISTRY with serving: the registry file a pipeline run published
  UNEXRL_FEATURE_REPO   optional Feast repository folder (features.repo)
  UNEXRL_SESSION_STORE  local (default: sessions and pending pages in the process, one replica or sticky
                        sessions) or redis (shared by every replica, on UNEXRL_REDIS)
  UNEXRL_API_TOKEN      the bearer token /recommend and /feedback require (in Kubernetes from a Secret), or
  UNEXRL_API_TOKEN_FILE a file holding it; neither: one is generated into <BENTOML_HOME>/api-token
BentoML's own /livez, /readyz and /metrics serve the probes and Prometheus; unexrl.serve.gateway the rest of
what stands before the API (token, body limit, one error shape, one log line per client error).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bentoml
import torch
from bentoml.exceptions import InvalidArgument, NotFound, ServiceUnavailable

from unexrl.contracts.artifact import read_artifact
from unexrl.serve.api import (
    FeedbackItem,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    RecommendRequest,
    RecommendResponse,
    RequestContext,
    StageAction,
)
from unexrl.serve.engine import (
    Recommender,
    RequestError,
    UnknownRequest,
    check_served_version,
    serving_config,
)
from unexrl.serve.gateway import ClientErrors, Gate, QuietClientErrors, api_token
from unexrl.serve.local import bentoml_home
from unexrl.serve.package import ARTIFACT_SUBDIR, DEFAULT_MODEL, ENV_MODEL, ENV_SHADOW_MODEL
from unexrl.serve.sessions import SessionStoreUnavailable, open_sessions


@contextmanager
def _as_http_errors() -> Iterator[None]:
    """The engine's errors as the HTTP status that names them: bad input 400, an unknown page 404, the shared
    session store unreachable 503 (the client may retry)."""
    try:
        yield
    except RequestError as err:
        raise InvalidArgument(str(err)) from None
    except UnknownRequest as err:
        raise NotFound(str(err)) from None
    except SessionStoreUnavailable as err:
        raise ServiceUnavailable(str(err)) from None


@bentoml.service(name="unexrl", workers=1, traffic={"timeout": 30}, http={"port": 3000})
class Recommendation:
    """Pages from the multi-stage cascade with the trained stage policies; feedback updates the session."""

    model = bentoml.models.BentoModel(os.environ.get(ENV_MODEL, DEFAULT_MODEL))

    def __init__(self) -> None:
        # one request is a batch of one: intra-op threads only contend with the HTTP workers for the cores
        torch.set_num_threads(1)
        primary = Path(self.model.path) / ARTIFACT_SUBDIR
        # verified (signature, every file's hash) and bound to the tag before its config builds anything; the
        # engine verifies the artifact again as it loads the policy, against the same version
        manifest = read_artifact(primary)
        check_served_version(primary, manifest, self.model.tag.version)
        cfg = serving_config(manifest, dict(os.environ))
        shadow_tag = os.environ.get(ENV_SHADOW_MODEL)
        shadow = bentoml.models.get(shadow_tag) if shadow_tag else None
        self.engine = Recommender(
            cfg,
            primary,
            primary_version=self.model.tag.version,
            shadow=Path(shadow.path) / ARTIFACT_SUBDIR if shadow is not None else None,
            shadow_version=shadow.tag.version if shadow is not None else None,
            sessions=open_sessions(dict(os.environ)),
            role=os.environ.get("UNEXRL_ROLE", "stable"),
        )

    @bentoml.api(input_spec=RecommendRequest, output_spec=RecommendResponse)
    def recommend(
        self, user_id: int, context: RequestContext | None = None, candidates: list[int] | None = None
    ) -> RecommendResponse:
        """A page for the user: features, pool, then each stage's actor ranks and the last stage's order is shown."""
        with _as_http_errors():
            page = self.engine.recommend(user_id, context.session_id if context else None, candidates)
        e = self.engine
        return RecommendResponse(
            request_id=page.request_id,
            model_version=e.version,
            user_id=user_id,
            session_id=page.session.session_id,
            step=page.session.step,
            items=page.items,
            actions=[
                StageAction(stage=name, candidates=n, weights=dict(zip(heads, action)))
                for name, heads, action, n in zip(e.stage_names, e.heads, page.actions, page.candidates)
            ],
            cold_start=page.cold_start,
            degraded=page.degraded,
        )

    @bentoml.api(input_spec=FeedbackRequest, output_spec=FeedbackResponse)
    def feedback(
        self, request_id: str, session_id: int, items: list[FeedbackItem], session_end: bool = False
    ) -> FeedbackResponse:
        """What the user did with a page: updates the session state and the long-term reward metrics."""
        with _as_http_errors():
            result = self.engine.feedback(request_id, session_id, items, session_end)
        s = result.session
        return FeedbackResponse(
            request_id=request_id,
            session_id=s.session_id,
            step=s.step,
            session_items_watched=s.items_watched,
            session_watch_time_s=s.watch_time_s,
            session_ended=result.ended,
            pushed=result.pushed,
        )

    @bentoml.api(route="/version")
    def version(self) -> Health:
        """The served model version; also the framework floor that `unexrl bench serve` compares against."""
        return Health(status="ok", model_version=self.engine.version)


# the first one added is the outermost: ClientErrors sees every response, the Gate's included
Recommendation.add_asgi_middleware(ClientErrors)
Recommendation.add_asgi_middleware(Gate, token=api_token(os.environ, Path(bentoml_home())))
logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietClientErrors())
