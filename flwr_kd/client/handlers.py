"""Handlers that make a Flower `ClientApp` a flwr-kd client.

`KDClient(...).register(app)` adds:

- `query.architecture`: the node's timm architecture and sample count, and the fingerprint of
  the public set it holds (the server asks once);
- `train`: load the received weights of this node's architecture, train on private data, and
  reply the weights plus float16 logits on the round's public inputs, sent as images or as
  indices into the node's own public set (FedDF's teacher; `flwr_kd.publicset`);
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
from flwr_kd.client.node import ClientData, load_split_partition, node_seed, resolve_architecture
from flwr_kd.configs import (
    DeviceConfig,
    EvaluateConfig,
    FedMDRoundConfig,
    MessageHeader,
    TrainConfig,
)
from flwr_kd.distill import digest
from flwr_kd.models import create_model, load_numpy_state, state_to_numpy
from flwr_kd.publicset import CLIPPED_KEY, FINGERPRINT_KEY, fingerprint, logits_for_wire
from flwr_kd.publicset import public_inputs as received_public_inputs
from flwr_kd.records import State, record_to_state, state_to_record, to_numpy
from flwr_kd.state import open_state_store
from flwr_kd.training import evaluate, predict_logits, train_supervised, train_with_early_stopping


def train_private(
    model,
    data: ClientData,
    epochs: int,
    settings: TrainConfig | FedMDRoundConfig,
    seed: int,
    device: DeviceConfig,
    lr: float | None = None,
) -> float:
    """Train on the node's private training part at the message's batch size and lr (a
    `train` message; FedMD's revisit passes its own `lr`); returns the last epoch's mean loss."""
    return train_supervised(
        model,
        data.train_x,
        data.train_y,
        epochs=epochs,
        batch_size=settings.batch_size,
        lr=settings.lr if lr is None else lr,
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
        """The node's architecture and sample count, and the fingerprint of the public set it
        holds, if any (FedDF then sends it indices instead of images)."""
        config = message.content[protocol.CONFIG]
        data = self.load_data(context, config)
        arch = resolve_architecture(context, config)
        answer = {"arch": arch}
        if data.public_x is not None:
            answer[FINGERPRINT_KEY] = fingerprint(data.public_x)
        return reply(
            message,
            **{
                protocol.CONFIG: ConfigRecord(answer),
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
            x = received_public_inputs(message.content[protocol.PUBLIC], config, data.public_x)
            logits, metrics[CLIPPED_KEY] = logits_for_wire(
                predict_logits(model, x, device), settings.logits_dtype
            )
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
        named by `state-uri`, under this node's id. A node without a saved model there (its
        init failed, it joined late, its state was lost) rejoins: it fine-tunes its
        architecture's transfer-learned weights from `pretrained-uri` first, and replies
        `rejoined` 1.
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
        saved = None if settings.phase == "init" else store.load(key)
        t = time.perf_counter()
        if saved is None:
            start = self._fedmd_start(message, settings, arch, key)
            load_numpy_state(model, start)
            self._finetune(model, data, settings, seed, device)
            timings["finetune-seconds"] = time.perf_counter() - t
        if settings.phase != "init":
            if saved is not None:
                load_numpy_state(model, saved)
            t = time.perf_counter()
            consensus = message.content[protocol.CONSENSUS]
            public = self._public(to_numpy(consensus["indices"]), data)
            digest(
                model,
                public,
                to_numpy(consensus["logits"]),
                config=settings,
                labels=to_numpy(consensus["labels"]) if "labels" in consensus else None,
                seed=seed,
                device=device,
            )
            timings["digest-seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            revisit = (settings.revisit_epochs, settings, seed + 1, device, settings.revisit_lr)
            train_private(model, data, *revisit)
            timings["revisit-seconds"] = time.perf_counter() - t
        store.save(key, state_to_numpy(model))
        t = time.perf_counter()
        indices = to_numpy(message.content[protocol.PUBLIC]["indices"])
        logits, clipped = logits_for_wire(
            predict_logits(model, self._public(indices, data), device), settings.logits_dtype
        )
        timings["logits-seconds"] = time.perf_counter() - t
        metrics = {
            "num-examples": len(data.train_x),
            "rejoined": int(settings.phase != "init" and saved is None),
            CLIPPED_KEY: clipped,
            **timings,
        }
        if data.test_x is not None:
            test = (data.test_x, data.test_y, device, data.task_classes)
            metrics["test-accuracy"] = evaluate(model, *test)[1]
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
    def _fedmd_start(message: Message, settings: FedMDRoundConfig, arch: str, key: str) -> State:
        """The weights a node without a saved model fine-tunes: the message's (init), else its
        architecture's transfer-learned weights, published at `pretrained-uri` (a rejoin)."""
        if settings.phase == "init":
            return record_to_state(message.content[protocol.ARRAYS])
        pretrained = None
        if settings.pretrained_uri:
            store = open_state_store(settings.pretrained_uri)
            pretrained = store.load(FedMDRoundConfig.pretrained_key(arch))
        if pretrained is None:
            raise ValueError(
                f"no saved model for {key} in {settings.state_uri}, and no transfer-learned "
                f"'{arch}' weights to rejoin from: run phase 'init' first"
            )
        return pretrained

    @staticmethod
    def _finetune(model, data: ClientData, settings: FedMDRoundConfig, seed: int, device) -> None:
        """FedMD's private fine-tuning of transfer-learned weights, with early stopping on the
        node's held-out slice (the init phase, and a rejoin)."""
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

    @staticmethod
    def _public(indices: np.ndarray, data: ClientData) -> np.ndarray:
        if data.public_x is None:
            raise ValueError("this client has no public data; its load_data must set public_x")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(data.public_x)):
            raise ValueError(f"public indices out of range for {len(data.public_x)} samples")
        return data.public_x[indices]
