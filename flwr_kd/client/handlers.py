"""Handlers that make a Flower `ClientApp` a flwr-kd client.

`KDClient(...).register(app)` adds:

- `query.architecture`: the node's timm architecture and sample count (the server asks once);
- `train`: load the received weights of this node's architecture, train on private data, and
  reply the weights plus float16 logits on the round's public inputs (FedDF's teacher);
- `evaluate`: accuracy of the received model on the node's held-out private data;
- `train.fedmd`: one fused FedMD round (see `fedmd_round`).

The same functions serve the simulation engine and the client Cloud Function. They are plain
functions of (Message, Context): no state lives in the ClientApp object, which Flower pickles
with every message in simulation. Each trains and infers on the device its message's config
names (`device`, `autocast`: `flwr_kd.configs.DeviceConfig`; "auto" when absent).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_kd import protocol
from flwr_kd.configs import (
    DeviceConfig,
    EvaluateConfig,
    FedMDRoundConfig,
    MessageHeader,
    TrainConfig,
)
from flwr_kd.data import DataSpec, load_federated
from flwr_kd.distill import digest
from flwr_kd.models import ModelSpec, create_model, load_numpy_state, state_to_numpy
from flwr_kd.records import record_to_state, state_to_record
from flwr_kd.state import open_state_store
from flwr_kd.training import evaluate, predict_logits, train_supervised, train_with_early_stopping


@dataclass
class ClientData:
    """A client's private data: a training part and a held-out part, plus the model shape."""

    train_x: np.ndarray
    train_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray
    model_spec: ModelSpec
    public_x: np.ndarray | None = None  # FedMD: the public set, addressed by index
    test_x: np.ndarray | None = None  # optional shared test set for per-round accuracy
    test_y: np.ndarray | None = None


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("node config has no 'partition-id'; set it, or pass load_data")
    return int(context.node_config["partition-id"])


def node_seed(context: Context) -> int:
    """A per-node seed that is stable across runs: the partition id where there is one."""
    return int(context.node_config.get("partition-id", context.node_id % 100_000))


def load_split_partition(context: Context, config: ConfigRecord) -> ClientData:
    """The default data source: this node's partition of the flwr-kd split named in config."""
    data = load_federated(DataSpec.from_config(dict(config)))
    train_x, train_y, hold_x, hold_y = data.client_data(partition_id(context))
    return ClientData(
        train_x, train_y, hold_x, hold_y, data.model_spec, data.public_x, data.test_x, data.test_y
    )


def resolve_architecture(context: Context, config: ConfigRecord | None = None) -> str:
    """This node's timm architecture: node config `arch`, else the `archs` list of the run
    config (or of the server's message) indexed by partition id."""
    if "arch" in context.node_config:
        return str(context.node_config["arch"])
    for source in (context.run_config, config or {}):
        if "archs" in source:
            archs = [a.strip() for a in str(source["archs"]).split(",") if a.strip()]
            return archs[partition_id(context) % len(archs)]
    raise ValueError("no architecture: set node config 'arch' or run config 'archs'")


def train_private(
    model,
    data: ClientData,
    epochs: int,
    settings: TrainConfig | FedMDRoundConfig,
    seed: int,
    device: DeviceConfig,
) -> float:
    """Train on the node's private training part at the message's batch size and lr (a
    `train` message, FedMD's revisit); returns the last epoch's mean loss."""
    return train_supervised(
        model,
        data.train_x,
        data.train_y,
        epochs=epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=seed,
        device=device,
    )


def reply(message: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=message)


@dataclass
class KDClient:
    """flwr-kd's client logic, parameterised by where the private data comes from."""

    load_data: Callable[[Context, ConfigRecord], ClientData] = load_split_partition

    def register(self, app: ClientApp) -> ClientApp:
        app.query("architecture")(self.describe)
        app.train()(self.train)
        app.evaluate()(self.evaluate)
        app.train("fedmd")(self.fedmd_round)
        return app

    # -- handlers -----------------------------------------------------------------------

    def describe(self, message: Message, context: Context) -> Message:
        config = message.content[protocol.CONFIG]
        data = self.load_data(context, config)
        arch = resolve_architecture(context, config)
        return reply(
            message,
            **{
                protocol.CONFIG: ConfigRecord({"arch": arch}),
                protocol.METRICS: MetricRecord({"num-examples": len(data.train_x)}),
            },
        )

    def _model(self, message: Message, context: Context, data: ClientData, sent: MessageHeader):
        """This node's architecture and its model with the received weights (which must be of
        that architecture, if the message names one)."""
        arch = resolve_architecture(context, message.content[protocol.CONFIG])
        if sent.arch and sent.arch != arch:
            raise ValueError(f"server sent a '{sent.arch}' model to a '{arch}' node")
        model = create_model(arch, data.model_spec)
        load_numpy_state(model, record_to_state(message.content[protocol.ARRAYS]))
        return arch, model

    def train(self, message: Message, context: Context) -> Message:
        config = message.content[protocol.CONFIG]
        settings, device = TrainConfig.from_config(config), DeviceConfig.from_config(config)
        data = self.load_data(context, config)
        arch, model = self._model(message, context, data, settings)
        t0 = time.perf_counter()
        seed = settings.server_round * 100_000 + node_seed(context)
        loss = train_private(model, data, settings.local_epochs, settings, seed, device)
        metrics = {
            "num-examples": len(data.train_x),
            "train-loss": loss,
            "train-seconds": time.perf_counter() - t0,
        }
        records = {
            protocol.ARRAYS: state_to_record(state_to_numpy(model)),
            protocol.CONFIG: ConfigRecord({"arch": arch}),
        }
        if protocol.PUBLIC in message.content:
            t1 = time.perf_counter()
            x = message.content[protocol.PUBLIC]["x"].numpy()
            logits = predict_logits(model, x, device).astype(np.dtype(settings.logits_dtype))
            records[protocol.LOGITS] = ArrayRecord({"logits": Array(logits)})
            metrics["logits-seconds"] = time.perf_counter() - t1
        records[protocol.METRICS] = MetricRecord(metrics)
        return reply(message, **records)

    def evaluate(self, message: Message, context: Context) -> Message:
        config = message.content[protocol.CONFIG]
        data = self.load_data(context, config)
        sent = EvaluateConfig.from_config(config)
        arch, model = self._model(message, context, data, sent)
        device = DeviceConfig.from_config(config)
        loss, acc = evaluate(model, data.holdout_x, data.holdout_y, device)
        return reply(
            message,
            **{
                protocol.CONFIG: ConfigRecord({"arch": arch}),
                protocol.METRICS: MetricRecord(
                    {"num-examples": len(data.holdout_x), "loss": loss, "accuracy": acc}
                ),
            },
        )

    def fedmd_round(self, message: Message, context: Context) -> Message:
        """One FedMD round in one call: digest the previous consensus, revisit the private
        data, and reply logits on the next public subset (the paper needs three calls).

        `phase=init` instead fine-tunes the received pretrained weights on private data, with
        early stopping on the held-out slice. The client's model persists in the state store
        named by `state-uri`, under this node's id.
        """
        config = message.content[protocol.CONFIG]
        settings, device = FedMDRoundConfig.from_config(config), DeviceConfig.from_config(config)
        data = self.load_data(context, config)
        arch = resolve_architecture(context, config)
        if settings.arch and settings.arch != arch:
            raise ValueError(f"server addressed a '{settings.arch}' node, this node is '{arch}'")
        store = open_state_store(settings.state_uri)
        key = f"node-{context.node_id}"
        model = create_model(arch, data.model_spec)
        seed = settings.server_round * 100_000 + node_seed(context)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        if settings.phase == "init":
            load_numpy_state(model, record_to_state(message.content[protocol.ARRAYS]))
            train_with_early_stopping(
                model,
                data.train_x,
                data.train_y,
                data.holdout_x,
                data.holdout_y,
                max_epochs=settings.finetune_epochs,
                patience=settings.finetune_patience,
                seed=seed,
                batch_size=settings.batch_size,
                lr=settings.lr,
                device=device,
            )
            timings["finetune-seconds"] = time.perf_counter() - t
        else:
            state = store.load(key)
            if state is None:
                raise ValueError(
                    f"no saved model for {key} in {settings.state_uri}: run phase 'init' first"
                )
            load_numpy_state(model, state)
            consensus = message.content[protocol.CONSENSUS]
            public = self._public(consensus["indices"].numpy(), data)
            digest(
                model,
                public,
                consensus["logits"].numpy(),
                config=settings,
                seed=seed,
                device=device,
            )
            timings["digest-seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            train_private(model, data, settings.revisit_epochs, settings, seed + 1, device)
            timings["revisit-seconds"] = time.perf_counter() - t
        store.save(key, state_to_numpy(model))
        t = time.perf_counter()
        indices = message.content[protocol.PUBLIC]["indices"].numpy()
        logits = predict_logits(model, self._public(indices, data), device)
        logits = logits.astype(np.dtype(settings.logits_dtype))
        timings["logits-seconds"] = time.perf_counter() - t
        metrics = {"num-examples": len(data.train_x), **timings}
        if data.test_x is not None:
            metrics["test-accuracy"] = evaluate(model, data.test_x, data.test_y, device)[1]
        return reply(
            message,
            **{
                protocol.LOGITS: ArrayRecord({"logits": Array(logits), "indices": Array(indices)}),
                protocol.CONFIG: ConfigRecord(
                    {"arch": arch, "subset-round": settings.subset_round}
                ),
                protocol.METRICS: MetricRecord(metrics),
            },
        )

    @staticmethod
    def _public(indices: np.ndarray, data: ClientData) -> np.ndarray:
        if data.public_x is None:
            raise ValueError("this client has no public data; its load_data must set public_x")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(data.public_x)):
            raise ValueError(f"public indices out of range for {len(data.public_x)} samples")
        return data.public_x[indices]
