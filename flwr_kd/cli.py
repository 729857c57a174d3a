"""`flwr-kd` command line: `flwr-kd simulate ...`."""

from __future__ import annotations

import argparse
import os
import sys

from flwr_kd.data import PARTITIONERS, DataError, load_federated
from flwr_kd.experiment import STRATEGIES, ConfigError, ExperimentConfig
from flwr_kd.models import UnknownArchitectureError, check_architecture
from flwr_kd.strategy import TooFewReplies


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flwr-kd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run an experiment in local simulation (Ray)")
    _experiment_flags(sim)
    sim.add_argument("--verbose", action="store_true", help="show Flower's logs")
    sim.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="run on this existing Ray cluster (head's host:port, or auto) from one of its "
        "nodes (default: $RAY_ADDRESS; none: Ray on this machine alone)",
    )
    cloud = sub.add_parser("cloud", help="serverless runtime (Cloud Functions)").add_subparsers(
        dest="cloud_command", required=True, parser_class=_Parser
    )
    emu = cloud.add_parser("emulate", help="the serverless stack against local emulators")
    _experiment_flags(emu)
    _cloud_flags(emu)
    emu.add_argument(
        "--deployment-mode",
        choices=("isolated", "pooled"),
        default="isolated",
        help="terraform's deployment_mode: a function per client, or one per architecture pool",
    )
    run = cloud.add_parser("run", help="drive a deployment (terraform outputs)")
    _experiment_flags(run)
    _cloud_flags(run)
    run.add_argument("--outputs", help="file with `terraform output -json`")
    run.add_argument("--project", help="find the functions with the Cloud Functions API instead")
    run.add_argument("--region", help="with --project")
    run.add_argument(
        "--name-prefix", default="flwr-kd", help="with --project: terraform's name_prefix"
    )
    run.add_argument("--no-auth", action="store_true", help="send no ID token (for local URLs)")
    run.add_argument(
        "--skip-active-check",
        action="store_true",
        help="do not ask the Cloud Functions API whether every function is ACTIVE",
    )
    cloud.add_parser(
        "emulators",
        help=(
            "start fake-gcs-server and the Firestore emulator until Ctrl-C; "
            "prints their environment"
        ),
    )
    audit = cloud.add_parser(
        "audit", help="check that a run's records are complete (rounds, calls, verdicts, models)"
    )
    audit.add_argument("run_id", metavar="RUN")
    audit.add_argument(
        "--outputs",
        help=(
            "file with `terraform output -json` (default: the emulators named by "
            "STORAGE_EMULATOR_HOST and FIRESTORE_EMULATOR_HOST)"
        ),
    )
    audit.add_argument(
        "--bucket", default="flwr-kd-arrays", help="arrays bucket, without --outputs"
    )
    audit.add_argument(
        "--database", default="(default)", help="Firestore database, without --outputs"
    )
    return parser


def _cloud_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-id", help="name of the run in Firestore (default: generated)")
    p.add_argument("--resume", metavar="RUN", help="resume RUN at its first unfinished round")
    p.add_argument("--max-concurrency", type=int, default=8, help="client calls in flight")
    p.add_argument("--call-timeout", type=float, default=600.0, help="seconds per call attempt")
    p.add_argument("--retries", type=int, default=4)


def _experiment_flags(sim: argparse.ArgumentParser) -> None:
    d = ExperimentConfig()
    sim.add_argument("--strategy", default=d.strategy, help=f"one of {', '.join(STRATEGIES)}")
    sim.add_argument("--dataset", default=d.dataset, help="digits, fashion-mnist or hf:<name>")
    sim.add_argument(
        "--public-dataset",
        default=d.public_dataset,
        help="public set from another task (FedMD's regime), e.g. digits; default: a cut of "
        "--dataset",
    )
    sim.add_argument("--clients", type=int, default=d.num_clients)
    sim.add_argument(
        "--partitioner",
        default=d.partitioner,
        help=f"how private data is split over clients: {', '.join(PARTITIONERS)}",
    )
    sim.add_argument(
        "--alpha",
        type=float,
        default=d.alpha,
        help="Dirichlet alpha (--partitioner dirichlet); 0 for IID",
    )
    sim.add_argument("--rounds", type=int, default=d.num_server_rounds)
    sim.add_argument("--archs", default=d.archs, help="timm model names, comma-separated")
    sim.add_argument("--seed", type=int, default=d.seed)
    sim.add_argument("--local-epochs", type=int, default=d.local_epochs)
    sim.add_argument("--distill-steps", type=int, default=d.distill_steps)
    sim.add_argument("--teacher", default=d.teacher, help="clients (logits from clients) or server")
    sim.add_argument("--logits-dtype", default=d.logits_dtype)
    sim.add_argument("--fanout", default=d.fanout, help="process (parallel) or serial")
    sim.add_argument("--device", default=d.device, help="auto (cuda, mps, cpu), cpu, cuda[:N], mps")
    sim.add_argument(
        "--min-replies", type=int, default=d.min_replies, help="valid replies a round needs"
    )
    sim.add_argument(
        "--round-timeout",
        type=float,
        default=d.round_timeout,
        help="seconds before stragglers are cut (0: 3600)",
    )
    sim.add_argument(
        "--fail-rate",
        type=float,
        default=d.fail_rate,
        help="inject faults into this share of client calls (off: 0)",
    )
    sim.add_argument(
        "--fail-kinds", default=d.fail_kinds, help="fault kinds, comma-separated (flwr_kd.faults)"
    )
    sim.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run-config key (see flwr_kd.experiment), repeatable",
    )
    sim.add_argument("--no-baseline", action="store_true", help="skip the local-only baseline")
    sim.add_argument(
        "--track",
        default=d.track,
        help="experiment tracking: mlflow (pip install 'flwr-kd[track]'; MLFLOW_TRACKING_URI, "
        "else a local store in --out)",
    )
    sim.add_argument(
        "--out", default="runs/latest", help="directory for result.json and accuracy.png"
    )


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Validated experiment config: raises ConfigError/DataError/UnknownArchitectureError."""
    extra = {}
    for item in args.run_config:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--run-config expects KEY=VALUE, got '{item}'")
        extra[key.strip()] = value.strip()
    cfg = ExperimentConfig.from_run_config(
        {
            "strategy": args.strategy,
            "dataset": args.dataset,
            "public-dataset": args.public_dataset,
            "num-clients": args.clients,
            "alpha": args.alpha,
            "partitioner": args.partitioner,
            "num-server-rounds": args.rounds,
            "archs": args.archs,
            "seed": args.seed,
            "local-epochs": args.local_epochs,
            "distill-steps": args.distill_steps,
            "teacher": args.teacher,
            "logits-dtype": args.logits_dtype,
            "fanout": args.fanout,
            "device": args.device,
            "min-replies": args.min_replies,
            "round-timeout": args.round_timeout,
            "fail-rate": args.fail_rate,
            "fail-kinds": args.fail_kinds,
            "local-only-baseline": not args.no_baseline,
            "track": args.track,
            "out-dir": args.out,
            **extra,
        }
    )
    data = load_federated(cfg.data_spec)  # sample counts and image sizes are known only now
    for arch in cfg.arch_list:
        check_architecture(arch, data.model_spec)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "cloud" and args.cloud_command == "audit":
        from flwr_kd.cloud_commands import audit

        return audit(args)
    if args.command == "cloud" and args.cloud_command == "emulators":
        from flwr_kd.serverless.emulators import serve_emulators

        serve_emulators()
        return 0
    try:
        cfg = config_from_args(args)
    except (ConfigError, DataError, UnknownArchitectureError) as exc:
        print(f"flwr-kd: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "simulate":
            from flwr_kd.simulation import simulate

            simulate(cfg, verbose=args.verbose, ray_address=args.ray_address)
            return 0
        from flwr_kd.cloud_commands import run_cloud

        return run_cloud(args, cfg)
    except ConfigError as exc:
        print(f"flwr-kd: error: {exc}", file=sys.stderr)
        return 2
    except TooFewReplies as exc:
        hint = f"; resume it with --resume {exc.run_id}" if exc.run_id else ""
        print(f"flwr-kd: error: {exc}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
