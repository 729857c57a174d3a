"""`flwr-kd simulate` on an in-process grid: the study's runs without Ray's start-up.

    python benchmarks/inprocess.py simulate --strategy feddf --dataset digits --out runs/x ...

The same arguments as `flwr-kd simulate` (parsed by flwr_kd.cli), the same ServerApp path
(`flwr_kd.runner.run_experiment`) and the same `KDClient` handlers, but the clients run one after
another in this process on the strategy tests' grid (tests/inprocess_grid.py), as
`make gpu-check` runs them. Ray's 45-60 s start-up per run is gone, and a GPU is the clients' own,
so `benchmarks/run.py --engine inprocess --workers N --device cuda` can run a study's runs side by
side on one machine with many cores or a GPU. Results match a Ray run's to within the
nondeterminism of parallel kernels, not bit for bit; `args.json` records the engine.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import inprocess_grid, server_side_run

from flwr_kd.cli import _parser, config_from_args
from flwr_kd.runner import run_experiment


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "simulate":
        print("inprocess.py runs `simulate` only", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    grid, run_id = inprocess_grid(cfg.num_clients)
    with (
        tempfile.TemporaryDirectory(prefix="flwr-kd-inprocess-") as tmp,
        server_side_run(run_id, Path(tmp) / "phases.log"),
    ):
        run_experiment(grid, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
