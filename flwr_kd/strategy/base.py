"""What every flwr-kd strategy shares: the run contract, the fan-out it may own, input checks.

The runner and the strategy wrappers (`flwr_kd.strategy.wrappers`) code against this contract:
`prepare()` is what must happen before round 1 and returns the arrays Flower's round loop starts
from; `close()` releases what the strategy created itself; `start()` keeps Flower's signature and
is prepare, Flower's loop, then close.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_kd.fanout import FanOut, ProcessFanOut


class KDStrategy(Strategy):
    """A Flower strategy with flwr-kd's `prepare` / `close` contract."""

    fanout: FanOut | None = None
    _owns_fanout = False

    def use_fanout(self, fanout: FanOut | None) -> None:
        """Run per-architecture tasks on `fanout`; without one, on a process pool created
        here, which `close()` shuts down."""
        self._owns_fanout = fanout is None
        self.fanout = fanout or ProcessFanOut()

    def prepare(
        self, grid: Grid, initial_arrays: ArrayRecord, train_config: ConfigRecord, timeout: float
    ) -> ArrayRecord:
        """What must happen before round 1; returns the arrays round 1 starts from."""
        return initial_arrays

    def close(self) -> None:
        """Close the fan-out this strategy created itself (one passed in stays open)."""
        if self._owns_fanout and self.fanout is not None:
            self.fanout.close()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's `Strategy.start` from the prepared arrays, then `close()`."""
        train_config = ConfigRecord() if train_config is None else train_config
        try:
            arrays = self.prepare(grid, initial_arrays, train_config, timeout)
            return super().start(
                grid, arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
            )
        finally:
            self.close()


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got '{value}'")


def check_min_replies(min_replies: int) -> None:
    """A round needs at least one valid reply."""
    if min_replies < 1:
        raise ValueError(f"min_replies must be at least 1, got {min_replies}")


def public_subset(n_public: int, size: int, seed: int, server_round: int) -> np.ndarray:
    """Sorted indices of round `server_round`'s public subset: `size` of `n_public`, the same
    for a seed and round on every call. int32, as they travel (FedMD sends them every round)."""
    rng = np.random.default_rng((seed, server_round))
    return np.sort(rng.choice(n_public, size, replace=False)).astype(np.int32)
