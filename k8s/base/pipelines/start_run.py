"""Start one run of the continuous-training pipeline (the recurring run's CronJob calls this).

Environment: KFP_HOST (KFP API), KFP_NAMESPACE (the profile namespace), KFP_PIPELINE (pipeline name),
KFP_PIPELINE_VERSION (a PipelineVersion name; empty: the newest version), KFP_EXPERIMENT, KFP_PARAMS (JSON
object of pipeline parameters). The KFP SDK authenticates with the projected token at
KF_PIPELINES_SA_TOKEN_PATH. Exits non-zero if the pipeline or version does not exist, so the Job fails visibly.
"""

import json
import os
import sys
import time


def choose_version(versions, wanted):
    """The version named ``wanted``, else (``wanted`` empty) the newest by creation time."""
    if wanted:
        for v in versions:
            if v.display_name == wanted or getattr(v, "name", None) == wanted:
                return v
        raise LookupError(f"pipeline version {wanted!r} not found")
    if not versions:
        raise LookupError("the pipeline has no versions")
    return max(versions, key=lambda v: v.created_at)


def all_versions(client, pipeline_id):
    """Every version of the pipeline, page by page: the newest or a named one may be on any page."""
    versions, token = [], ""
    while True:
        page = client.list_pipeline_versions(pipeline_id=pipeline_id, page_token=token, page_size=100)
        versions += page.pipeline_versions or []
        token = page.next_page_token
        if not token:
            return versions


def pipeline_id(client, name, namespace):
    """The id of the pipeline named ``name`` in ``namespace`` (the SDK's get_pipeline_id lists shared pipelines
    only, so it never finds one declared in a profile namespace), or None."""
    predicate = {"operation": "EQUALS", "key": "display_name", "stringValue": name}
    found = client.list_pipelines(filter=json.dumps({"predicates": [predicate]}), namespace=namespace)
    pipelines = found.pipelines or []
    if len(pipelines) > 1:
        raise LookupError(f"{len(pipelines)} pipelines named {name!r} in {namespace!r}")
    return pipelines[0].pipeline_id if pipelines else None


def main(client=None) -> int:
    import kfp

    env = os.environ
    namespace = env.get("KFP_NAMESPACE") or None
    client = client or kfp.Client(host=env["KFP_HOST"], namespace=namespace)
    found = pipeline_id(client, env["KFP_PIPELINE"], namespace)
    if found is None:
        print(f"pipeline {env['KFP_PIPELINE']!r} not found in namespace {namespace!r}", file=sys.stderr)
        return 2
    version = choose_version(all_versions(client, found), env.get("KFP_PIPELINE_VERSION", ""))
    experiment = client.create_experiment(name=env.get("KFP_EXPERIMENT", "unexrl"), namespace=namespace)
    run = client.run_pipeline(
        experiment_id=experiment.experiment_id,
        job_name=f"{env['KFP_PIPELINE']}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}",
        pipeline_id=found,
        version_id=version.pipeline_version_id,
        params=json.loads(env.get("KFP_PARAMS") or "{}"),
        # no enable_caching: KFP applies it to a package only; a stored version runs with its compiled
        # per-task caching (ingest-logs and resolve-incumbent never cache, so each night reads new logs)
    )
    print(f"started run {run.run_id} of {env['KFP_PIPELINE']} version {version.display_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
