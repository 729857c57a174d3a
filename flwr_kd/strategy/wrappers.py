"""Strategies that wrap a strategy: what a runtime adds to a run without the algorithm knowing.

`RoundCheckpoint(strategy, on_round_end)` hands every aggregated global model to a callback (the
serverless driver stores it and marks the round done); `RoundOffset(strategy, done)` continues a
run after a crash as rounds done+1, done+2, ... Compose them for a resumed run as
`RoundOffset(RoundCheckpoint(strategy, cb), done)`, so the callback sees the run's round numbers.

Contract with the wrapped strategy: `prepare(grid, initial_arrays, train_config, timeout)`
returns the arrays Flower's round loop starts from (FedMD: transfer learning and init phase)
and `close()` releases what the strategy created; a strategy without them needs neither.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """Delegates every round hook to `inner`; `start()` is prepare, Flower's loop on the
    wrapper (so its overrides take effect), then close."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

    def prepare(self, grid, initial_arrays, train_config, timeout) -> ArrayRecord:
        """The inner strategy's preparation before round 1 (none if it has no `prepare`)."""
        prepare = getattr(self.inner, "prepare", None)
        if prepare is None:
            return initial_arrays
        return prepare(grid, initial_arrays, train_config, timeout)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

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
        train_config = ConfigRecord() if train_config is None else train_config
        if evaluate_fn is not None:
            evaluate_fn = self.wrap_evaluate_fn(evaluate_fn)
        try:
            arrays = self.prepare(grid, initial_arrays, train_config, timeout)
            return Strategy.start(
                self, grid, arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
            )
        finally:
            self.close()

    def wrap_evaluate_fn(self, evaluate_fn):
        """The centralized evaluation Flower's loop calls; the caller's own by default."""
        return evaluate_fn


class RoundCheckpoint(StrategyWrapper):
    """Calls `on_round_end(round, arrays, inner)` once per aggregated round, right after
    aggregation: never for round 0 nor for a round a resumed run restored."""

    def __init__(
        self,
        inner: Strategy,
        on_round_end: Callable[[int, ArrayRecord, Strategy], None],
    ) -> None:
        super().__init__(inner)
        self.on_round_end = on_round_end

    def aggregate_train(self, server_round, replies):
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is not None:
            self.on_round_end(server_round, arrays, self.inner)
        return arrays, metrics


class RoundOffset(StrategyWrapper):
    """Flower's loop as rounds offset+1, offset+2, ... of the original run, from the restored
    global arrays: the inner strategy's preparation (FedMD's transfer learning and init phase)
    is not repeated."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        super().__init__(inner)
        self.offset = offset

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

    def prepare(self, grid, initial_arrays, train_config, timeout) -> ArrayRecord:
        return initial_arrays

    def wrap_evaluate_fn(self, evaluate_fn):
        """The caller's evaluation, told the round numbers of the original run."""
        return lambda r, arrays: evaluate_fn(r + self.offset, arrays)
