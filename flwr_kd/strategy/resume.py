"""Continue a strategy after a crash: `RoundOffset(strategy, done)` runs Flower's `start()`
loop as rounds done+1, done+2, ... of the original run, from the restored global arrays."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy


class RoundOffset(Strategy):
    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.inner.summary()

    def start(
        self,
        grid,
        initial_arrays,
        num_rounds=3,
        timeout=3600,
        train_config=None,
        evaluate_config=None,
        evaluate_fn=None,
    ):
        """Flower's loop only (a FedMD's transfer learning and init phase are not repeated)."""
        shifted = (
            None
            if evaluate_fn is None
            else (lambda r, arrays: evaluate_fn(r + self.offset, arrays))
        )
        return super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, shifted
        )
