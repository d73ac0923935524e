"""Request and response models of the service: the OpenAPI schema is generated from these, so every field
carries its description here. Types are strict (no bool or string where a number is declared, no number where a
bool is), and integers are bounded to int64 so no JSON number can overflow a tensor."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SESSION_ID_MAX = 2**62
MAX_CANDIDATES = 8192
MAX_FEEDBACK_ITEMS = 1024
MAX_BODY_BYTES = 1 << 20
"""the largest request body read: a full candidate list of int64 ids is about 170 KiB"""

ItemId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RequestContext(_Strict):
    session_id: int | None = Field(
        default=None,
        ge=1,
        le=SESSION_ID_MAX,
        description="The session this page continues: a session_id the service issued for this user. Omitted: "
        "the service starts a new session and returns its id. An id it did not issue to this user, or of a "
        "session that ended, is a 404.",
    )


class RecommendRequest(_Strict):
    user_id: int = Field(
        ge=INT64_MIN,
        le=INT64_MAX,
        description="The user. Ids outside the model's id space (new users) get a cold-start page: no user "
        "embedding, non-personalised retrieval.",
    )
    context: RequestContext | None = Field(default=None, description="Optional request context.")
    candidates: list[ItemId] | None = Field(
        default=None,
        max_length=MAX_CANDIDATES,
        description="Optional candidate pool (distinct catalogue item ids, at least as many as the first stage "
        "keeps). Omitted: the pool comes from the retrieval channels (user interest, popular, random).",
    )


class StageAction(_Strict):
    stage: str = Field(description="Cascade stage name (configs: cascade.stages[].name).")
    candidates: int = Field(description="How many candidates the stage ranked.")
    weights: dict[str, float] = Field(
        description="The stage actor's action: one fusion weight per prediction head; a candidate's score is "
        "the weighted sum of its head predictions."
    )


class RecommendResponse(_Strict):
    request_id: str = Field(description="Identifies this page; send it back with /feedback.")
    model_version: str = Field(description="Version of the policy artifact that chose the actions.")
    user_id: int = Field(description="The user, as requested.")
    session_id: int = Field(
        description="The session this page belongs to (server-issued): send it with /feedback and the next "
        "/recommend."
    )
    step: int = Field(
        description="Pages of this session whose feedback was received before this one was chosen: the session "
        "step the policy acted on (a page asked for before the previous page's feedback shares its step)."
    )
    items: list[int] = Field(description="The page: item ids in the order to show them.")
    actions: list[StageAction] = Field(description="Each stage's action, in cascade order.")
    cold_start: bool = Field(description="The user is outside the model's id space and was served cold.")
    degraded: bool = Field(
        description="The feature store was unreachable; session and history took defaults."
    )


class FeedbackItem(_Strict):
    item_id: int = Field(ge=INT64_MIN, le=INT64_MAX, description="An item of the page that the user viewed.")
    watch_time_s: float = Field(
        ge=0.0, le=86400.0, allow_inf_nan=False, description="Seconds watched: at most the item's duration."
    )
    click: bool = Field(default=False, description="The user clicked the item.")
    like: bool = Field(default=False, description="The user liked the item.")


class FeedbackRequest(_Strict):
    request_id: str = Field(
        min_length=1, max_length=64, description="request_id of the page, from /recommend."
    )
    session_id: int = Field(
        ge=1, le=SESSION_ID_MAX, description="session_id of the page, from /recommend: the page must be its."
    )
    items: list[FeedbackItem] = Field(
        max_length=MAX_FEEDBACK_ITEMS,
        description="The viewed items of the page, each at most once; items not listed were not viewed.",
    )
    session_end: bool = Field(default=False, description="The user left: the session ends after this page.")


class FeedbackResponse(_Strict):
    request_id: str = Field(description="The page this feedback was for.")
    session_id: int = Field(description="Its session.")
    step: int = Field(description="Pages of the session whose feedback was received, this one included.")
    session_items_watched: int = Field(description="Items viewed in the session so far.")
    session_watch_time_s: float = Field(description="Seconds watched in the session so far.")
    session_ended: bool = Field(
        description="The session has ended (session_end, or the feedback of its session.max_requests-th page; "
        "a feedback retried after another page ended it says so too)."
    )
    pushed: bool = Field(
        description="The session state and the user's behaviour row reached the feature store (false: store down)."
    )


class Health(_Strict):
    status: str = Field(description="'ok'.")
    model_version: str = Field(description="Version of the served policy artifact.")


class ErrorBody(_Strict):
    """Every 4xx the service answers has this body (the OpenAPI schema of its error responses)."""

    error: str = Field(description="What is wrong, naming the field (JSON path) where there is one.")
    detail: str = Field(default="", description="The field (JSON path) at fault, or empty.")
