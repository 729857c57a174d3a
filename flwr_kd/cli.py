"""`flwr-kd` command line: `flwr-kd simulate ...`."""

from __future__ import annotations

import argparse
import sys

from flwr_kd.data import DataError, load_federated
from flwr_kd.experiment import STRATEGIES, ConfigError, ExperimentConfig
from flwr_kd.models import UnknownArchitectureError, check_architecture


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flwr-kd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = ExperimentConfig()
    sim = sub.add_parser("simulate", help="run an experiment in local simulation (Ray)")
    sim.add_argument("--strategy", default=d.strategy, help=f"one of {', '.join(STRATEGIES)}")
    sim.add_argument("--dataset", default=d.dataset, help="digits, fashion-mnist or hf:<name>")
    sim.add_argument("--clients", type=int, default=d.num_clients)
    sim.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet alpha; 0 for IID")
    sim.add_argument("--rounds", type=int, default=d.num_server_rounds)
    sim.add_argument("--archs", default=d.archs, help="timm model names, comma-separated")
    sim.add_argument("--seed", type=int, default=d.seed)
    sim.add_argument("--local-epochs", type=int, default=d.local_epochs)
    sim.add_argument("--distill-steps", type=int, default=d.distill_steps)
    sim.add_argument("--teacher", default=d.teacher, help="clients (logits from clients) or server")
    sim.add_argument("--logits-dtype", default=d.logits_dtype)
    sim.add_argument("--fanout", default=d.fanout, help="process (parallel) or serial")
    sim.add_argument(
        "-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
        help="any other run-config key (see flwr_kd.experiment), repeatable",
    )
    sim.add_argument("--no-baseline", action="store_true", help="skip the local-only baseline")
    sim.add_argument("--out", default="runs/latest", help="directory for result.json and accuracy.png")
    sim.add_argument("--verbose", action="store_true", help="show Flower's logs")
    return parser


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
            "num-clients": args.clients,
            "alpha": args.alpha,
            "num-server-rounds": args.rounds,
            "archs": args.archs,
            "seed": args.seed,
            "local-epochs": args.local_epochs,
            "distill-steps": args.distill_steps,
            "teacher": args.teacher,
            "logits-dtype": args.logits_dtype,
            "fanout": args.fanout,
            "local-only-baseline": not args.no_baseline,
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
    try:
        cfg = config_from_args(args)
    except (ConfigError, DataError, UnknownArchitectureError) as exc:
        print(f"flwr-kd: error: {exc}", file=sys.stderr)
        return 2
    from flwr_kd.simulation import simulate

    simulate(cfg, verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
