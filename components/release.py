"""Incumbent resolution, evaluation, the gate, packaging and the GitOps deployment."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components.images import CPU_IMAGE, SERVING_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def resolve_incumbent(registry: str, environment: str, incumbent: Output[Model]) -> bool:
    """The policy deployed in ``environment`` per the model registry, as this run's incumbent artifact; returns
    whether one exists (False on a first release: the artifact is empty and CEM stands in).

    Args:
        registry: Model registry directory (on the PVC): the deployed version per environment.
        environment: Deployment target whose deployed policy is the incumbent.
        incumbent: A copy of the deployed policy artifact (empty on a first release).
    """
    from pathlib import Path

    from unexrl.pipeline import registry as reg

    record = reg.resolve_incumbent(registry, environment, Path(incumbent.path))
    incumbent.metadata.update(record.model_dump(mode="json") if record else {"deployed": False})
    return record is not None


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    config: str,
    config_overrides: list,
    evaluation_seeds: list,
    candidate: Input[Model],
    cem: Input[Model],
    incumbent: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Candidate vs incumbent and CEM on held-out seeds: long-term reward with 95% CIs, paired uplifts, per-stage
    action statistics, decision latency.

    Args:
        config: Configuration: a name in configs/ (small, default, paper) or a YAML path.
        config_overrides: --set items applied to the configuration.
        evaluation_seeds: Held-out seeds ([]: the config's seeds.evaluation); training or validation seeds are refused.
        candidate: The trained policy to release.
        cem: CEM, the production baseline.
        incumbent: The deployed policy (empty on a first release: CEM stands in).
        evaluation: summary.json (what the gate reads), report.md and evaluation.png.
        metrics: Watch time per policy, the uplift's CI and the p99 latency, for the UI.
        report: The evaluation as Markdown, for the UI.
    """
    from pathlib import Path

    from unexrl.contracts import files
    from unexrl.io import atomic_write_text
    from unexrl.pipeline import steps

    summary = steps.evaluate(
        steps.resolve_config(config, config_overrides),
        candidate=Path(candidate.path),
        cem=Path(cem.path),
        incumbent=Path(incumbent.path),
        out=Path(evaluation.path),
        seeds=[int(s) for s in evaluation_seeds],
    )
    for name, value in steps.evaluation_metrics(summary).items():
        metrics.log_metric(name, value)
    atomic_write_text(Path(report.path), (Path(evaluation.path) / files.REPORT).read_text())


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gate(
    evaluation: Input[Artifact],
    min_uplift_pct: float,
    latency_budget_ms: float,
    decision: Output[Artifact],
    report: Output[Markdown],
) -> bool:
    """Pass only if uplift over the incumbent >= ``min_uplift_pct`` with the CI's lower bound > 0, every action
    finite and within bounds, and p99 decision latency <= ``latency_budget_ms``. The decision is recorded.

    Args:
        evaluation: The evaluation's summary.json (refused, naming the field, if it is impossible).
        min_uplift_pct: Least uplift of watch time per session over the incumbent, percent.
        latency_budget_ms: Largest p99 decision latency for one request through all stages, ms.
        decision: The decision: every check with its figures.
        report: The decision as Markdown, for the UI.
    """
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
def package(model: Input[Model], decision: Input[Artifact], bentoml_home: str, bento: Output[Artifact]):
    """Import the candidate into the BentoML model store and build the serving Bento, offline, only if the gate
    passed exactly this artifact.

    Args:
        model: The policy the gate passed.
        decision: The gate's decision (it names the candidate it passed by the sha256 of its manifest).
        bentoml_home: BentoML store to build into (empty: BENTOML_HOME or BentoML's default).
        bento: bento.json (the bento and model tags, the model version, the image tag, the archive's sha256) and
            unexrl-serving.bento, the Bento exported from the step's store for CI to import and containerize.
    """
    from pathlib import Path

    from unexrl.pipeline import release

    record = release.package(
        Path(model.path), Path(bento.path), decision=Path(decision.path), bentoml_home=bentoml_home
    )
    bento.metadata.update(record.model_dump(mode="json"))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def deploy(
    bento: Input[Artifact],
    model: Input[Model],
    gitops_repo: str,
    environment: str,
    gitops_branch: str,
    registry: str,
) -> str:
    """GitOps: commit the model version and image tag to the environment's overlay (never the cluster API), then
    record the release in the model registry. Returns the commit sha.

    Args:
        bento: What package built.
        model: The released policy, stored in the registry under its version.
        gitops_repo: Git repository (URL or path) with k8s/overlays/.
        environment: The overlay k8s/overlays/<environment>/ to point at the new release.
        gitops_branch: Branch the commit goes to (created when absent; Argo CD watches it).
        registry: Model registry directory (empty: no registry record).
    """
    from pathlib import Path

    from unexrl.pipeline import release

    record = release.deploy(
        Path(bento.path),
        Path(model.path),
        gitops_repo=gitops_repo,
        environment=environment,
        gitops_branch=gitops_branch,
        registry=registry,
    )
    return record.commit
