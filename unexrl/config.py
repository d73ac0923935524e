"""One typed configuration for every part of the platform.

Configs are YAML files in ``configs/``; ``--set dotted.key=value`` overrides any field. Unknown keys and wrong
types are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

HEADS = ("affinity", "expected_watch", "quality", "novelty", "popularity", "shortness")
"""Prediction heads a stage model may emit; a stage's action has one weight per head it emits."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, frozen=True)


class UserType(_Strict):
    """How one hidden behaviour type of users responds; the agents never see the type, only its effects."""

    name: str
    """label used in reports"""
    share: float = Field(gt=0)
    """relative share of users with this type"""
    affinity_weight: float = 1.0
    """weight of true user-item affinity in the watch-fraction logit"""
    quality_weight: float = 1.0
    """weight of (quality - 0.5) in the watch-fraction logit"""
    shortness_weight: float = 0.0
    """weight of -log(duration / median duration) in the watch-fraction logit (bingers like short videos)"""
    fatigue: float = 0.3
    """logit penalty per repeat of the item's category in the recent window"""
    novelty_bonus: float = 0.0
    """logit bonus when the item's category is absent from the recent window"""
    budget: float = Field(default=3.0, gt=0)
    """initial satisfaction budget (patience)"""
    cost_per_item: float = Field(default=1.0, gt=0)
    """satisfaction spent on every item watched"""
    gain: float = Field(default=1.5, ge=0)
    """satisfaction returned per unit of (watch fraction x quality factor)"""
    activity_group_accuracy: float = Field(default=0.8, ge=0, le=1)
    """probability that the observable activity group equals the type index (else uniform)"""


class WorldConfig(_Strict):
    """Items and users: sizes and the distributions they are drawn from."""

    n_users: int = Field(default=5000, ge=1)
    """number of users"""
    n_items: int = Field(default=50_000, ge=10)
    """number of items in the catalogue"""
    n_categories: int = Field(default=30, ge=2)
    """number of item categories"""
    latent_dim: int = Field(default=16, ge=2)
    """dimension of user and item latent vectors"""
    category_zipf: float = Field(default=0.8, ge=0)
    """Zipf exponent of category sizes"""
    item_spread: float = Field(default=0.6, ge=0)
    """spread of item latents around their category centroid"""
    interests_per_user: int = Field(default=3, ge=1)
    """number of categories mixed into a user's interest vector"""
    affinity_scale: float = Field(default=3.0, gt=0)
    """scale of cosine(user, item) in the true affinity logit"""
    duration_median_s: float = Field(default=25.0, gt=0)
    """median video duration in seconds"""
    duration_sigma: float = Field(default=0.8, gt=0)
    """log-normal sigma of durations"""
    user_types: tuple[UserType, ...] = (
        UserType(
            name="quality",
            share=0.4,
            quality_weight=3.0,
            shortness_weight=-1.0,
            fatigue=0.25,
            budget=4.0,
            gain=1.6,
        ),
        UserType(name="novelty", share=0.3, quality_weight=0.5, fatigue=2.0, novelty_bonus=1.5, budget=3.0),
        UserType(name="binger", share=0.3, quality_weight=0.5, shortness_weight=3.5, fatigue=0.3, budget=3.0),
    )
    """hidden behaviour types; the activity group shown to agents is a noisy copy of the type index"""


class StageConfig(_Strict):
    """One stage of the cascade: its stage models and how many candidates it keeps."""

    name: str
    """stage label (matching, prerank, ranking, ...)"""
    keep: int = Field(ge=1)
    """number of candidates this stage passes on (the last stage's keep is the page size)"""
    heads: tuple[Literal[HEADS], ...]  # type: ignore[valid-type]
    """prediction heads of this stage's models, in action order"""
    noise: float = Field(ge=0)
    """std of the stage models' prediction error (shrinks downstream)"""


class CascadeConfig(_Strict):
    """The multi-stage cascade: pool size and stages, matching first."""

    pool_size: int = Field(default=300, ge=2)
    """items in the retrieval pool I^1"""
    stages: tuple[StageConfig, ...] = (
        StageConfig(
            name="matching", keep=20, heads=("affinity", "popularity", "novelty", "shortness"), noise=0.9
        ),
        StageConfig(
            name="prerank", keep=10, heads=("affinity", "expected_watch", "quality", "novelty"), noise=0.5
        ),
        StageConfig(
            name="ranking",
            keep=5,
            heads=("affinity", "expected_watch", "quality", "novelty", "shortness"),
            noise=0.25,
        ),
    )
    """stages in execution order (2 to 5)"""
    action_low: float = -1.0
    """lower bound of every action weight"""
    action_high: float = 1.0
    """upper bound of every action weight"""
    channel_shares: tuple[float, float, float] = (0.5, 0.25, 0.25)
    """pool shares of the retrieval channels: user interest, popular, random"""

    @model_validator(mode="after")
    def _check_sizes(self) -> CascadeConfig:
        if not 2 <= len(self.stages) <= 5:
            raise ValueError(f"cascade.stages: need 2 to 5 stages, got {len(self.stages)}")
        previous = self.pool_size
        for i, stage in enumerate(self.stages):
            if stage.keep >= previous:
                raise ValueError(
                    f"cascade.stages.{i}.keep: {stage.keep} must be smaller than the {previous} candidates it gets"
                )
            if len(set(stage.heads)) != len(stage.heads) or not stage.heads:
                raise ValueError(f"cascade.stages.{i}.heads: must be a non-empty list without repeats")
            previous = stage.keep
        if self.action_low >= self.action_high:
            raise ValueError("cascade.action_low must be below cascade.action_high")
        return self

    @property
    def sizes(self) -> tuple[int, ...]:
        """Candidate counts through the cascade: pool, then what each stage keeps."""
        return (self.pool_size, *(s.keep for s in self.stages))

    @property
    def action_dims(self) -> tuple[int, ...]:
        return tuple(len(s.heads) for s in self.stages)

    @property
    def page_size(self) -> int:
        return self.stages[-1].keep


class SessionConfig(_Strict):
    """Session mechanics shared by every user type."""

    max_requests: int = Field(default=40, ge=1)
    """hard cap on requests per session (sessions normally end when satisfaction runs out)"""
    history_window: int = Field(default=10, ge=1)
    """items remembered for fatigue and novelty"""
    watch_noise: float = Field(default=0.5, ge=0)
    """std of the per-view noise on the watch-fraction logit"""
    fatigue_items: float = Field(default=60.0, gt=0)
    """session-level tiredness: every item costs an extra (items watched so far / fatigue_items)"""
    quality_gain_floor: float = Field(default=0.3, ge=0)
    """quality factor of satisfaction gain is floor + quality"""
    seconds_between_requests: float = Field(default=5.0, ge=0.01)
    """idle time between a page's watch time and the session's next request, for event timestamps: at least
    10 ms, so a request comes after its previous page's feedback whatever the rounding of the float32 session
    watch time the timestamps are built from (under 1 ms up to 16,000 s; the logs' and the features' time rules)"""


class LoggingPolicyConfig(_Strict):
    """The behaviour policy that `unexrl simulate` runs to write logs."""

    kind: Literal["cem", "random", "artifact"] = "cem"
    """cem: tuned CEM weights (tuned on the fly when no artifact given); random: uniform weights; artifact: --policy"""
    exploration_std: float = Field(default=0.1, ge=0)
    """std of Gaussian noise added to every action weight (clipped to the action range)"""
    sessions: int = Field(default=2000, ge=1)
    """number of sessions to log"""
    batch_size: int = Field(default=512, ge=1)
    """sessions simulated in parallel"""
    start_time: str = "2026-11-01T00:00:00Z"
    """event time of the first session start"""


class CEMConfig(_Strict):
    """Cross-entropy search over non-personalised per-stage weights (the production baseline)."""

    iterations: int = Field(default=12, ge=1)
    """number of CEM iterations"""
    population: int = Field(default=32, ge=2)
    """candidates per iteration"""
    elite_fraction: float = Field(default=0.25, gt=0, le=1)
    """fraction of candidates kept to refit the sampling distribution"""
    sessions_per_candidate: int = Field(default=48, ge=1)
    """sessions simulated to score one candidate"""
    init_std: float = Field(default=0.5, gt=0)
    """initial std of the sampling distribution"""
    min_std: float = Field(default=0.05, gt=0)
    """floor on the sampling std, to keep exploring"""


class EvaluationConfig(_Strict):
    """Offline evaluation: rollouts on held-out seeds and bootstrap confidence intervals."""

    sessions_per_seed: int = Field(default=1000, ge=1)
    """sessions rolled out per evaluation seed (users drawn uniformly)"""
    batch_size: int = Field(default=1000, ge=1)
    """sessions simulated in parallel"""
    bootstrap: int = Field(default=1000, ge=10)
    """bootstrap resamples for 95% confidence intervals"""


class SeedsConfig(_Strict):
    """Random seeds, kept apart by purpose: tuning never sees an evaluation seed."""

    world: int = 0
    """seed of the world (users, items, stage models)"""
    train: tuple[int, ...] = (1000, 1001, 1002, 1003)
    """seeds for tuning, training and log simulation"""
    validation: tuple[int, ...] = (2000, 2001)
    """seeds for model selection"""
    evaluation: tuple[int, ...] = (3000, 3001, 3002, 3003, 3004)
    """held-out seeds for reported results"""

    @model_validator(mode="after")
    def _disjoint(self) -> SeedsConfig:
        groups = {
            "train": set(self.train),
            "validation": set(self.validation),
            "evaluation": set(self.evaluation),
        }
        names = list(groups)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                common = groups[a] & groups[b]
                if common:
                    raise ValueError(f"seeds.{a} and seeds.{b} share {sorted(common)}: keep them apart")
        if not all(groups.values()):
            raise ValueError("seeds: train, validation and evaluation each need at least one seed")
        for name in names:
            listed = getattr(self, name)
            if len(set(listed)) != len(listed):
                raise ValueError(
                    f"seeds.{name} {list(listed)} names a seed twice: a repeated seed repeats the same sessions, "
                    "and the bootstrap over seeds would count them as independent"
                )
        return self

    def check_unseen(
        self, seen: Iterable[int], what: str, purposes: tuple[str, ...] = ("validation", "evaluation")
    ) -> None:
        """Refuse training on ``what`` (an input whose manifest says it came from the simulator seeds ``seen``) when
        those include one of this config's ``purposes`` seeds: model selection or the reported results would then
        read sessions the policy was built from."""
        for purpose in purposes:
            if common := sorted(set(seen) & set(getattr(self, purpose))):
                raise ValueError(
                    f"{what} came from seeds {common}, which are this config's seeds.{purpose}: train only on "
                    f"data from other seeds, or choose other seeds.{purpose}"
                )


class FeaturesConfig(_Strict):
    """Feature computation from logs and the reward groups of CQR."""

    repo: str = "feature_repo"
    """Feast repository (definitions and feature_store.yaml), relative to the project root or absolute"""
    cqr_unit: Literal["page", "item"] = "page"
    """what CQR rescales: page = the request's page watch time per user group; item = each viewed item's watch
    time per (user group, duration bucket), summed over the page (unexrl/rl/cqr.py says why page is the default)"""
    duration_bucket_edges_s: tuple[float, ...] = (10.0, 20.0, 40.0, 80.0)
    """item duration buckets in seconds (len + 1 buckets): an item feature, and CQR's item group G_i at item level"""
    cqr_knots: int = Field(default=101, ge=3)
    """quantile knots per (user group, item group) cell, at levels 0, 1/(n-1), ..., 1"""
    recent_items: int = Field(default=20, ge=1)
    """length of the recent item / category id lists served as user features"""
    environment: str = Field(default="local", pattern=r"^[a-z][a-z0-9_-]*$")
    """Feast environment: local = feature_repo/feature_store.yaml, else feature_repo/environments/<name>.yaml"""
    cqr_refit_s: float = Field(default=3600.0, gt=0)
    """CQR knots are refitted every this many seconds of event time, each fit on feedback logged before it"""
    quality_prior_views: float = Field(default=5.0, ge=0)
    """item quality estimate: mean watch fraction shrunk towards 0.5 with this many pseudo-views"""
    item_cache_check_s: float = Field(default=10.0, ge=0)
    """serving: how often the item cache checks the registry for a new materialisation (unexrl/features/cache.py),
    and a replica the published registry for a new publication (unexrl/features/published.py)"""
    bench_reads: int = Field(default=300, ge=10)
    """`unexrl bench features`: timed online reads per store (p50 / p99 reported)"""
    bench_candidates: int = Field(default=500, ge=1)
    """`unexrl bench features`: candidate items per online read"""


ALGOS = ("unexrl-cic", "unexrl-ctde", "td3", "ddpg", "independent-ddpg")
BASELINES = ("cem", "group-cem", "oracle-group-cem-ranking", "oracle-group-cem-all", "popular-matching")
"""the named fixed-weight baselines (unexrl/policies/baselines.py), in report order"""


class AlgoConfig(_Strict):
    """The learning algorithm: UNEX-RL (CIC or CTDE) or a baseline, and its hyper-parameters."""

    name: Literal[ALGOS] = "unexrl-cic"  # type: ignore[valid-type]
    """unexrl-cic | unexrl-ctde | td3 | ddpg (single agent on the ranking stage) | independent-ddpg"""
    agents: int | None = None
    """learning stages, counted from the last (ranking) stage; the rest stay at CEM weights (None: all; td3/ddpg: 1)"""
    sg: bool = True
    """stopping gradient: actor i gets only the direct gradient of Q through a^i"""
    cqr: bool = True
    """train on category-quantile-rescaled rewards instead of raw watch time"""
    gamma: float = Field(default=1.0, ge=0, le=1)
    """discount per request (1: the session's total, which is what is reported; sessions always end)"""
    polyak: float = Field(default=0.005, gt=0, le=1)
    """target network update rate"""
    actor_lr: float = Field(default=1e-4, gt=0)
    """learning rate of the actors' dense heads"""
    critic_lr: float = Field(default=1e-3, gt=0)
    """learning rate of the critics' dense heads"""
    batch_size: int = Field(default=256, ge=2)
    """transitions per update"""
    hidden: int = Field(default=64, ge=8)
    """width of every MLP"""
    embedding_dim: int = Field(default=16, ge=2)
    """dimension of every embedding table"""
    policy_delay: int = Field(default=2, ge=1)
    """critic updates per actor update (TD3; ddpg uses 1)"""
    proximal: float = Field(default=0.3, ge=0)
    """weight of ||mu(tau) - a_logged||^2 beside -Q / mean|Q| in the actor loss (TD3+BC): holds the actors where the
    critic has data; 0 is the paper's plain DDPG-style step"""
    actor_start: int = Field(default=1000, ge=0)
    """critic-only updates before the first actor step: the critic learns the behaviour policy's value first"""
    n_step: int = Field(default=3, ge=1)
    """requests the critic target looks ahead before bootstrapping: y = sum_{k<n} gamma^k r~_{t+k} + gamma^n Q'"""
    exploration_std: float = Field(default=0.3, ge=0)
    """Gaussian exploration noise when collecting online"""
    action_radius: float = Field(default=1.0, gt=0)
    """how far an actor may move each weight from its initial (CEM) value; the action box bounds it as well"""
    user_features: bool = True
    """the actors' and critics' dense inputs include the user's user_behaviour features (unexrl/user_features.py):
    the rollout's aggregates online, the point-in-time training set offline (so offline training needs one), the
    online store at serving"""


class TrainConfig(_Strict):
    """The training loop: online in the simulator, or offline from logs."""

    regime: Literal["online", "offline"] = "online"
    """online: collect with exploration, replay, update; offline: replay logged transitions only"""
    updates: int = Field(default=2000, ge=1)
    """gradient updates (critic steps)"""
    warmup_sessions: int = Field(default=1024, ge=1)
    """online: sessions collected under CEM + exploration before learning (also fits the CQR knots)"""
    sessions_per_collect: int = Field(default=32, ge=1)
    """online: sessions collected between rounds of updates"""
    updates_per_collect: int = Field(default=50, ge=1)
    """online: updates between collections"""
    buffer_size: int = Field(default=100_000, ge=100)
    """replay capacity in transitions"""
    eval_every: int = Field(default=500, ge=1)
    """updates between validation rollouts (the learning curve)"""
    eval_sessions: int = Field(default=200, ge=1)
    """sessions per validation rollout"""
    checkpoint_every: int = Field(default=500, ge=1)
    """updates between checkpoints"""
    embedding_lr: float = Field(default=0.01, gt=0)
    """learning rate of the row-wise Adagrad that trains the embedding tables (fused and sharded under torchrun,
    on sparse gradients in one process)"""
    select: Literal["best_validation", "final"] = "best_validation"
    """which actors the export and the experiment use: the best validation point (model selection) or the last"""
    compile: bool = False
    """compile the update's dense regions (the actors through CIC, the critic loss, the actor loss) with
    torch.compile: on the 2-core CPU an update is 0.5-0.85 ms (12-16%) faster, after about 13 s of compiling in a
    fresh inductor cache (1-4 s from a warm one), so a run gains from about 20,000 updates on (docs/benchmarks.md);
    configs/default.yaml's 5,000 do not. Needs a C++ compiler at run time: without one the agent is refused when it
    is built (docs/training.md)"""


class DiagnosticsConfig(_Strict):
    """Critic diagnostics against the simulator's truth (`unexrl diagnose`, unexrl/rl/diagnostics.py)."""

    sessions: int = Field(default=400, ge=2)
    """fresh sessions of the last validation seed whose transitions score the critic (calibration, dQ/da)"""
    gradient_sessions: int = Field(default=600, ge=2)
    """sessions per finite-difference rollout of the true gradient (two rollouts per action weight)"""
    delta: float = Field(default=0.15, gt=0)
    """finite-difference step per weight"""
    batch_rows: int = Field(default=4000, ge=1)
    """rows per batched finite-difference rollout"""
    during_training: bool = True
    """run them at every validation point of `unexrl train` (into curve.json); off: only `unexrl diagnose` and the
    end of each experiment run"""


class ExperimentConfig(_Strict):
    """The paper's comparison on our simulator: algorithms x seeds, and the agents-count study."""

    seeds: int = Field(default=5, ge=1)
    """independent training runs per algorithm (each shifts seeds.train; evaluation seeds stay fixed)"""
    variants: tuple[str, ...] = (
        "cem",
        "group-cem",
        "oracle-group-cem-ranking",
        "oracle-group-cem-all",
        "ddpg",
        "td3",
        "unexrl-ctde",
        "unexrl-cic",
        "unexrl-cic-no-sg",
        "unexrl-cic-no-cqr",
        "unexrl-cic-plain-step",
        "unexrl-cic-no-features",
    )
    """rows of the results table: a baseline (unexrl/policies/baselines.py), an algo name, or an ablation
    (unexrl-cic-no-sg, unexrl-cic-no-cqr, unexrl-cic-plain-step, unexrl-cic-no-features: see unexrl/experiment.py)"""
    agents_algos: tuple[str, ...] = ("unexrl-cic", "unexrl-ctde", "independent-ddpg")
    """algorithms of the agents-count study"""
    agents_seeds: int = Field(default=3, ge=0)
    """seeds per point of the agents-count study (0 skips the study)"""
    agents_stages: tuple[StageConfig, ...] = (
        StageConfig(
            name="matching", keep=40, heads=("affinity", "popularity", "novelty", "shortness"), noise=0.9
        ),
        StageConfig(
            name="prerank", keep=20, heads=("affinity", "expected_watch", "quality", "novelty"), noise=0.6
        ),
        StageConfig(
            name="rank1", keep=10, heads=("affinity", "expected_watch", "quality", "novelty"), noise=0.4
        ),
        StageConfig(
            name="ranking",
            keep=5,
            heads=("affinity", "expected_watch", "quality", "novelty", "shortness"),
            noise=0.25,
        ),
    )
    """the 4-stage cascade on which 1..4 agents learn (the rest stay at CEM)"""
    eval_sessions_per_seed: int = Field(default=500, ge=1)
    """sessions per evaluation seed for each trained policy"""
    workers: int = Field(default=1, ge=1)
    """processes that train and evaluate runs at once (one torch thread each); 1 runs them in this process"""
    diagnose: bool = True
    """diagnose every main-table learner's final critic against the simulator's truth (results.json)"""


class BenchConfig(_Strict):
    """Benchmark sizes."""

    sim_batch: int = Field(default=1024, ge=1)
    """requests per batched simulator step"""
    repeats: int = Field(default=20, ge=1)
    """timed repetitions per measurement (median reported)"""
    large_batch: int = Field(default=1024, ge=2)
    """`unexrl bench train`: the larger batch measured beside algo.batch_size"""


class Config(_Strict):
    """The whole configuration."""

    name: str = "default"
    """config name, recorded in every manifest"""
    device: str = "cpu"
    """torch device for simulation and evaluation"""
    world: WorldConfig = WorldConfig()
    cascade: CascadeConfig = CascadeConfig()
    session: SessionConfig = SessionConfig()
    logging: LoggingPolicyConfig = LoggingPolicyConfig()
    cem: CEMConfig = CEMConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    seeds: SeedsConfig = SeedsConfig()
    features: FeaturesConfig = FeaturesConfig()
    algo: AlgoConfig = AlgoConfig()
    train: TrainConfig = TrainConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    experiment: ExperimentConfig = ExperimentConfig()
    bench: BenchConfig = BenchConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
            continue
        if part not in node or not isinstance(node[part], (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, where: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {'.'.join(where)}: '{part}' is not an index of a list of {len(node)}")
    return int(part)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as YAML so numbers, booleans and lists keep their types."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string; a number was meant
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config, apply ``dotted.key=value`` overrides, validate, and return the typed config."""
    tree: dict[str, Any] = Config().to_dict()
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = _merge(tree, loaded, ())
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        # JSON mode: YAML lists become tuples, ints are accepted for floats, nothing else is coerced.
        return Config.model_validate_json(json.dumps(tree))
    except ValidationError as err:
        lines = [f"invalid config{f' {path}' if path else ''}:"]
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {where}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _merge(base: dict[str, Any], new: dict[str, Any], where: tuple[str, ...]) -> dict[str, Any]:
    """Overlay ``new`` on the defaults; lists are replaced whole, unknown keys pass through to validation."""
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, (*where, key))
        else:
            out[key] = value
    return out
