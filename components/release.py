"""Incumbent resolution, evaluation, the gate, packaging and the GitOps deployment."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components.images import CPU_IMAGE, SERVING_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def resolve_incumbent(registry: str, environment: str, incumbent: Output[Model]) -> bool:
    """The policy deployed in ``environment`` per the model registry, as this run's incumbent artifact; returns
    whether one exists (False on a first release: the artifact is empty and CEM stands in)."""
    from pathlib import Path

    from unexrl.pipeline import registry as reg

    record = reg.resolve_incumbent(registry, environment, Path(incumbent.path))
    incumbent.metadata.update(record.model_dump(mode="json") if record else {"deployed": False})
    return record is not None


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    config: str,
    overrides: list,
    evaluation_seeds: list,
    candidate: Input[Model],
    cem: Input[Model],
    incumbent: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Candidate vs incumbent and CEM on held-out seeds: long-term reward with 95% CIs, paired uplifts, per-stage
    action statistics, decision latency (``evaluation_seeds`` empty: the config's seeds.evaluation)."""
    from pathlib import Path

    from unexrl.contracts import files
    from unexrl.pipeline import steps

    summary = steps.evaluate(
        steps.resolve_config(config, overrides),
        candidate=Path(candidate.path),
        cem=Path(cem.path),
        incumbent=Path(incumbent.path),
        out=Path(evaluation.path),
        seeds=[int(s) for s in evaluation_seeds],
    )
    for name, value in steps.evaluation_metrics(summary).items():
        metrics.log_metric(name, value)
    Path(report.path).write_text((Path(evaluation.path) / files.REPORT).read_text())


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gate(
    evaluation: Input[Artifact],
    min_uplift_pct: float,
    latency_budget_ms: float,
    decision: Output[Artifact],
    report: Output[Markdown],
) -> bool:
    """Pass only if uplift over the incumbent >= ``min_uplift_pct`` with the CI's lower bound > 0, every action
    finite and within bounds, and p99 decision latency <= ``latency_budget_ms``. The decision is recorded."""
    from pathlib import Path

    from unexrl.pipeline import steps

    result = steps.gate(
        Path(evaluation.path),
        min_uplift_pct=min_uplift_pct,
        latency_budget_ms=latency_budget_ms,
        decision_out=Path(decision.path),
        report_out=Path(report.path),
    )
    decision.metadata.update({"passed": result.passed, "reasons": result.reasons})
    return result.passed


@dsl.component(base_image=SERVING_IMAGE, install_kfp_package=False)
def package(model: Input[Model], bentoml_home: str, bento: Output[Artifact]):
    """Import the candidate into the BentoML model store and build the serving Bento, offline."""
    from pathlib import Path

    from unexrl.pipeline import release

    record = release.package(Path(model.path), Path(bento.path), bentoml_home=bentoml_home)
    bento.metadata.update(record.model_dump(mode="json"))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def deploy(
    bento: Input[Artifact], model: Input[Model], repo: str, environment: str, branch: str, registry: str
) -> str:
    """GitOps: commit the model version and image tag to the environment's overlay on ``branch`` of ``repo``
    (never the cluster API), then record the release in the model registry. Returns the commit sha."""
    from pathlib import Path

    from unexrl.pipeline import release

    record = release.deploy(
        Path(bento.path),
        Path(model.path),
        repo=repo,
        environment=environment,
        branch=branch,
        registry_root=registry,
    )
    return record.commit
