"""`unexrl` command line: a thin shell over the library; every subcommand takes --config and --set."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from unexrl.config import ConfigError, load_config

log = logging.getLogger("unexrl")

_CONFIG_HELP = "YAML config (configs/small.yaml, configs/default.yaml, configs/paper.yaml); defaults if omitted"
_SET_HELP = "override one config field, e.g. --set cascade.pool_size=500 --set seeds.evaluation=[7,8]; repeatable"


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", type=Path, help=_CONFIG_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="unexrl",
        description="UNEX-RL: multi-agent RL for multi-stage recommender cascades. "
        "Every subcommand reads a typed YAML config (--config) with --set overrides.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", parents=[common], help="simulate sessions under a behaviour policy and write Parquet logs",
                       description="Run the behaviour policy (config logging.kind: cem | random | artifact) with Gaussian "
                       "exploration in the simulator and write users/items/transitions Parquet tables plus a manifest.")
    p.add_argument("--out", type=Path, required=True, help="log directory to create (must not exist or be empty)")
    p.add_argument("--policy", type=Path, help="policy artifact to log with (logging.kind=artifact, or cem to skip tuning)")
    p.add_argument("--seed", type=int, help="rollout seed; must be one of seeds.train (default: the first)")

    p = sub.add_parser("cem", parents=[common], help="tune fixed per-stage weights by CEM and save a policy artifact",
                       description="Cross-entropy search over non-personalised per-stage weights on the training seeds.")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument("--group-by", default="none", choices=["none", "activity_group", "oracle_type"],
                   help="one weight vector per group (oracle_type uses the hidden type: an oracle, not deployable)")

    p = sub.add_parser("evaluate", parents=[common], help="evaluate policies on held-out seeds with 95%% CIs",
                       description="Roll policies out on fresh sessions of the evaluation seeds (all policies see the same "
                       "sessions) and report watch time per session, session length and requests per session.")
    p.add_argument("--policy", action="append", default=[], metavar="NAME=DIR", help="a policy artifact to evaluate; repeatable")
    p.add_argument("--no-references", action="store_true", help="skip the random and immediate-greedy reference policies")
    p.add_argument("--reference", default="cem", help="policy name that uplifts are computed against (default: cem)")
    p.add_argument("--seeds", default="evaluation", choices=["evaluation", "validation"], help="which seed set to roll out on")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--md", type=Path, help="write the results as a markdown table here")
    p.add_argument("--png", type=Path, help="write a bar chart with CIs here")

    p = sub.add_parser("run", parents=[common], help="the main job: tune baselines, simulate logs, evaluate, write a report",
                       description="What `make run` does: tune CEM and the oracle baselines on training seeds, log sessions "
                       "under CEM with exploration, evaluate every policy on held-out seeds, write report.md/json/png.")
    p.add_argument("--out", type=Path, required=True, help="run directory (artifacts, logs, report)")

    bench = sub.add_parser("bench", help="benchmarks with same-run references (ratios, not timed assertions)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = bench_sub.add_parser("sim", parents=[common], help="simulator throughput vs a lean reference cascade and the memory bound",
                             description="Requests/s of the cascade function, the whole simulator step, a lean reference cascade "
                             "on the same shapes and a memory-bandwidth bound, measured in one run, with their ratios.")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="print JSON (or write it to PATH)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S",
    )
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as err:
        print(f"unexrl: {err}", file=sys.stderr)
        return 2
    from unexrl import commands

    try:
        if args.command == "bench":
            result = commands.bench_sim(cfg)
            text = json.dumps(result, indent=2)
            if args.json and args.json != "-":
                Path(args.json).write_text(text + "\n")
            print(text if args.json else commands.format_bench(result))
            return 0
        handler = getattr(commands, args.command)
        return int(handler(cfg, args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"unexrl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
