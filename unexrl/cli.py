"""`unexrl` command line: a thin shell over the library; every subcommand takes --config and --set."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from unexrl.bundle import FEATURE_REPO, config_file
from unexrl.config import ALGOS, BASELINES, ConfigError, load_config
from unexrl.io import atomic_write_text

log = logging.getLogger("unexrl")

_CONFIG_HELP = "a bundled config's name (small, default, paper) or a YAML path (e.g. configs/small.yaml); defaults if omitted"
_SET_HELP = (
    "override one config field, e.g. --set cascade.pool_size=500 --set seeds.evaluation=[7,8]; repeatable"
)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", help=_CONFIG_HELP)
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level of unexrl's own loggers; other libraries log from WARNING on, or everything at DEBUG",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="unexrl",
        description="UNEX-RL: multi-agent RL for multi-stage recommender cascades. "
        "Every subcommand reads a typed YAML config (--config) with --set overrides.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        parents=[common],
        help="simulate sessions under a behaviour policy and write Parquet logs",
        description="Run the behaviour policy (config logging.kind: cem | random | artifact) with Gaussian "
        "exploration in the simulator and write users/items/transitions Parquet tables plus a manifest.",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="log directory to create (must not exist or be empty)"
    )
    p.add_argument(
        "--policy",
        type=Path,
        help="policy artifact to log with (logging.kind=artifact, or cem to skip tuning)",
    )
    p.add_argument("--seed", type=int, help="rollout seed; must be one of seeds.train (default: the first)")

    p = sub.add_parser(
        "cem",
        parents=[common],
        help="tune fixed per-stage weights by CEM and save a policy artifact",
        description="Cross-entropy search over non-personalised per-stage weights on the training seeds.",
    )
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument(
        "--group-by",
        default="none",
        choices=["none", "activity_group", "oracle_type"],
        help="one weight vector per group (oracle_type uses the hidden type: an oracle, not deployable)",
    )

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="evaluate policies on held-out seeds with 95%% CIs",
        description="Roll policies out on fresh sessions of the evaluation seeds (all policies see the same "
        "sessions) and report watch time per session, session length and requests per session.",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a policy artifact to evaluate; repeatable",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        choices=BASELINES,
        metavar="NAME",
        help=f"also tune this fixed-weight baseline on seeds.train and evaluate it; repeatable ({', '.join(BASELINES)})",
    )
    p.add_argument(
        "--no-references", action="store_true", help="skip the random and immediate-greedy reference policies"
    )
    p.add_argument(
        "--reference", default="cem", help="policy name that uplifts are computed against (default: cem)"
    )
    p.add_argument(
        "--seeds",
        default="evaluation",
        choices=["evaluation", "validation"],
        help="which seed set to roll out on",
    )
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--md", type=Path, help="write the results as a markdown table here")
    p.add_argument("--png", type=Path, help="write a bar chart with CIs here")

    p = sub.add_parser(
        "run",
        parents=[common],
        help="the simulator's report: tune baselines, simulate logs, evaluate, write a report",
        description="The simulator's report (`make run` runs the Kubeflow pipeline instead): tune CEM and the "
        "other fixed-weight baselines on training seeds, log sessions under CEM with exploration, evaluate every "
        "policy on held-out seeds, write report.md/json/png.",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory (artifacts, logs, report)")

    p = sub.add_parser(
        "train",
        parents=[common],
        help="train one algorithm; single-process or under torchrun (sharded)",
        description="Train UNEX-RL or a baseline online in the simulator, or offline from logs (--logs). "
        "Under `torchrun --nproc_per_node N -m unexrl train ...` the embedding tables are sharded with TorchRec "
        "(gloo on CPU, NCCL on CUDA) and the dense networks are data-parallel. Writes DCP checkpoints, "
        "curve.json and an `actors` artifact for serving to --out (docs/training.md).",
    )
    p.add_argument("--algo", choices=ALGOS, help="algorithm (sets algo.name)")
    p.add_argument(
        "--logs",
        type=Path,
        help="train offline from this `unexrl simulate` log directory (sets train.regime=offline)",
    )
    p.add_argument(
        "--training-set",
        type=Path,
        help="point-in-time training set of --logs (`unexrl features training-set`): "
        "checked against the logs, its sha256 recorded in the export",
    )
    p.add_argument(
        "--cem",
        type=Path,
        help="CEM artifact for the fixed stages and the warm-up (default: tune CEM on seeds.train)",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory: checkpoints/, export/, curve.json")
    p.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint in --out"
    )

    p = sub.add_parser(
        "diagnose",
        parents=[common],
        help="score a training run's critic against the simulator's truth",
        description="Load the newest checkpoint of an `unexrl train --out` directory and compare its critic "
        "with the simulator on fresh sessions of a validation seed: calibration (Q vs the Monte-Carlo return) "
        "and, per activity group, the critic's action gradient vs the true gradient of session watch time "
        "(finite differences, diagnostics.gradient_sessions per weight). Prints the table and writes "
        "diagnostics.json/.md/.png into the run (docs/training.md). --config/--set must be the run's own.",
    )
    p.add_argument("--run", type=Path, required=True, help="the run directory (checkpoints/, config.json)")

    p = sub.add_parser(
        "keys",
        parents=[common],
        help="a new ed25519 key pair for signing policy artifacts",
        description="Write private.pem (mode 0600: the pipeline's Secret, UNEXRL_SIGNING_KEY_FILE) and public.pem "
        "(each environment that must load only this pipeline's artifacts: UNEXRL_ARTIFACT_PUBLIC_KEYS) into "
        "--out (docs/security.md).",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for private.pem and public.pem")

    p = sub.add_parser(
        "experiment",
        parents=[common],
        help="the paper's comparison: every algorithm x seeds, and the agents-count study",
        description="Train CEM, DDPG, TD3, UNEX-RL-CTDE, UNEX-RL-CIC and the SG/CQR ablations (experiment.variants) "
        "--seeds times each, plus the agents-count study (CIC, CTDE, independent DDPG with 1..4 agents); evaluate "
        "on seeds.evaluation; write results.json, results.md and PNG plots. Re-running resumes finished runs.",
    )
    p.add_argument("--out", type=Path, required=True, help="experiment directory (runs/, results.*, plots)")
    p.add_argument("--seeds", type=int, help="training seeds per algorithm (experiment.seeds)")

    features = sub.add_parser(
        "features",
        help="feature tables from logs, Feast materialisation, point-in-time training sets",
        description="Feature store workflow (docs/features.md): build -> materialize -> training-set. "
        "Logs and features are local paths or URIs (s3://...); features.environment picks the store.",
    )
    features_sub = features.add_subparsers(dest="features_command", required=True, metavar="STEP")
    p = features_sub.add_parser(
        "build",
        parents=[common],
        help="compute feature tables with event timestamps from a log",
        description="Read and validate a log directory and write one Parquet table per feature view "
        "plus a manifest; no value uses information from after its event timestamp.",
    )
    p.add_argument("--logs", required=True, help="log directory (local path or URI)")
    p.add_argument("--out", required=True, help="feature directory to create (local path or URI)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing feature directory")
    p = features_sub.add_parser(
        "init",
        parents=[common],
        help="create a Feast repository from the package's template",
        description="Copy the bundled Feast repository (definitions, feature_store.yaml, environments/) to "
        "--repo; materialize and training-set then use it (features.repo, default ./feature_repo).",
    )
    p.add_argument(
        "--repo", type=Path, default=Path(FEATURE_REPO), help="directory to create (default: ./feature_repo)"
    )
    p = features_sub.add_parser(
        "materialize",
        parents=[common],
        help="feast apply + incremental materialisation (idempotent)",
        description="Register the definitions with sources at --features and load the online store "
        "up to the newest feature row; running it again changes nothing.",
    )
    p.add_argument(
        "--features", required=True, help="feature directory written by `features build` (local path or URI)"
    )
    p = features_sub.add_parser(
        "training-set",
        parents=[common],
        help="point-in-time features for every logged request",
        description="get_historical_features for the logged requests: one row per request keyed by "
        "request_id, written next to the transitions unless --out is given.",
    )
    p.add_argument("--logs", required=True, help="log directory (local path or URI)")
    p.add_argument("--out", help="Parquet file to write (default: LOGS/training_features.parquet)")

    p = sub.add_parser(
        "traffic",
        parents=[common],
        help="simulated users browse a running service (/recommend + /feedback)",
        description="Sessions of simulated users (the config's world and user model) ask a running service for "
        "pages, respond to the pages it returns and send feedback, until --sessions have run or --seconds "
        "have passed. The config must be the one the served policy was trained with (docs/serving.md).",
    )
    p.add_argument(
        "--url",
        required=True,
        action="append",
        help="base URL of the service, e.g. http://127.0.0.1:3000; repeat it for several replicas: the requests "
        "of every session alternate between them (round-robin, no affinity)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="file holding the service's API token (default: UNEXRL_API_TOKEN, UNEXRL_API_TOKEN_FILE, or the "
        "token a local service generated in <BENTOML_HOME>/api-token)",
    )
    p.add_argument("--sessions", type=int, default=100, help="sessions to run (default 100)")
    p.add_argument("--seconds", type=float, default=60.0, help="wall-clock bound in seconds (default 60)")
    p.add_argument("--concurrency", type=int, default=8, help="sessions in flight at once (default 8)")
    p.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="print the report as JSON (or write it to PATH)"
    )

    bench = sub.add_parser("bench", help="benchmarks with same-run references (ratios, not timed assertions)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = bench_sub.add_parser(
        "sim",
        parents=[common],
        help="simulator throughput vs a lean reference cascade and the memory bound",
        description="Requests/s of the cascade function, the whole simulator step, a lean reference cascade "
        "on the same shapes and a memory-bandwidth bound, measured in one run, with their ratios.",
    )
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="print JSON (or write it to PATH)")
    p = bench_sub.add_parser(
        "train",
        parents=[common],
        help="update throughput: UNEX-RL-CIC vs CTDE vs raw TorchRec EBC",
        description="Transitions/s of one UNEX-RL-CIC update and one UNEX-RL-CTDE update on the same batch "
        "(their ratio is CIC's overhead) and of a raw EmbeddingBagCollection forward+backward on the same "
        "tables and batch, measured in one run.",
    )
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="print JSON (or write it to PATH)")
    p = bench_sub.add_parser(
        "features",
        parents=[common],
        help="feature store: materialisation rows/s and online read latency",
        description="Materialise the same feature tables into SQLite and Redis and time online reads of a "
        "user plus features.bench_candidates candidates through the serving client, in one run.",
    )
    p.add_argument(
        "--logs",
        type=Path,
        help="log directory to build features from (default: simulate one with random weights)",
    )
    p.add_argument(
        "--redis",
        metavar="HOST:PORT",
        help="Redis to use (default: start redis-server on a free loopback port)",
    )
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="print JSON (or write it to PATH)")
    p = bench_sub.add_parser(
        "serve",
        parents=[common],
        help="/recommend latency and throughput vs a trivial endpoint; load test",
        description="Starts the BentoML service on loopback for each pool size (the config's and the "
        "paper's 2000 -> 500 -> 100 -> 10), times /recommend and the trivial /version endpoint of the same "
        "service in one run (p50/p99, requests/s, ratio), measures peak requests/s with wrk and holds 80%% "
        "of it for --load-seconds, reporting the error rate.",
    )
    p.add_argument(
        "--load-seconds",
        type=float,
        default=60.0,
        help="duration of the load test at 80%% of peak (default 60)",
    )
    p.add_argument("--requests", type=int, default=400, help="sequential requests per endpoint (default 400)")
    p.add_argument(
        "--config-pool-only",
        action="store_true",
        help="measure the config's pool size only (skip the paper's)",
    )
    p.add_argument(
        "--features",
        choices=("none", "live"),
        default="none",
        help="none: the feature store unreachable (the cheap fallback); live: a loopback redis-server holding "
        "the materialised features of --logs (default: a fresh random-policy log), and sessions on it",
    )
    p.add_argument("--logs", type=Path, help="--features live: the log directory whose features are served")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="print JSON (or write it to PATH)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # libraries' INFO lines (fbgemm's ~15 "Successfully loaded" on import, one per httpx request in `traffic` and
    # `bench serve`) would drown the run's own; DEBUG shows everything
    own = logging.getLevelName(args.log_level)
    logging.basicConfig(
        level=own if own == logging.DEBUG else max(own, logging.WARNING),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    logging.getLogger("unexrl").setLevel(own)
    try:
        cfg = load_config(config_file(args.config) if args.config else None, args.overrides)
    except (ConfigError, OSError) as err:
        print(f"unexrl: {err}", file=sys.stderr)
        return 2
    from unexrl import commands

    try:
        if args.command == "bench":
            if args.bench == "serve":
                from unexrl.serve.bench import bench_serve, format_bench_serve

                result, summary = (
                    bench_serve(
                        cfg,
                        requests=args.requests,
                        load_seconds=args.load_seconds,
                        include_paper=not args.config_pool_only,
                        features=args.features,
                        logs=args.logs,
                    ),
                    format_bench_serve,
                )
            elif args.bench == "features":
                result, summary = commands.bench_features(cfg, args), commands.format_bench_features
            elif args.bench == "train":
                from unexrl.bench.train import bench_train, format_bench_train

                result, summary = bench_train(cfg), format_bench_train
            else:
                result, summary = commands.bench_sim(cfg), commands.format_bench
            text = json.dumps(result, indent=2)
            if args.json and args.json != "-":
                atomic_write_text(Path(args.json), text + "\n")
            print(text if args.json else summary(result))
            return 0
        handler = getattr(commands, args.command)
        return int(handler(cfg, args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"unexrl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
