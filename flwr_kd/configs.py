"""Typed configs: one dataclass per message type and server task, and the one home of defaults.

A Flower message carries its settings as flat kebab-case keys in a `ConfigRecord`, beside the
data spec and the run's other keys, so `from_config` reads only its own keys and takes the
field's default for a missing one. The strategy (sender), the client handler (receiver) and
`ExperimentConfig` (run config) all take their defaults from these classes, so they cannot
disagree. Server tasks (distillation, transfer learning) prefix their keys (`distill-`,
`pretrain-`), as `DataSpec` does with `data-`, so they can share a record with a message's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11


class FlatConfig:
    """`to_config` / `from_config` for a dataclass of int, float and str fields."""

    PREFIX: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[str, ...]] = ()  # fields a config must hold (no default applies)

    def to_config(self) -> dict[str, Any]:
        """Every field as `<prefix><field-name>`: values for a Flower ConfigRecord."""
        return {_key(self.PREFIX, name): value for name, value in asdict(self).items()}

    @classmethod
    def from_config(cls, config) -> Self:
        """The fields whose keys `config` holds, coerced to the field's type; others default
        (a missing `REQUIRED` one is a KeyError). Keys that are not this class's are ignored."""
        for name in cls.REQUIRED:
            if _key(cls.PREFIX, name) not in config:
                raise KeyError(f"{cls.__name__} needs '{_key(cls.PREFIX, name)}'")
        template = cls()
        values = {
            f.name: type(getattr(template, f.name))(config[_key(cls.PREFIX, f.name)])
            for f in fields(cls)
            if _key(cls.PREFIX, f.name) in config
        }
        return replace(template, **values)


def _key(prefix: str, name: str) -> str:
    return prefix + name.replace("_", "-")


# -- client messages --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MessageHeader(FlatConfig):
    """What the strategy writes on each message it sends: the architecture of the model it
    carries (or asks for; empty: not named) and the server round (0: set-up)."""

    arch: str = ""
    server_round: int = 0

    def settings(self) -> dict[str, Any]:
        """`to_config()` without the header: what a whole run sends alike."""
        header = {_key(self.PREFIX, f.name) for f in fields(MessageHeader)}
        return {k: v for k, v in self.to_config().items() if k not in header}


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(MessageHeader):
    """An `evaluate` message: score the received global model on the node's held-out data.
    It has no settings beyond its header."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig(MessageHeader):
    """A `train` message (HeteroFedAvg, FedDF): local training of the received model, then
    logits on the round's public inputs when the message carries them (FedDF's teacher)."""

    local_epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    logits_dtype: str = "float16"  # of the logits sent back; float16 halves their size


@dataclass(frozen=True, kw_only=True)
class FedMDRoundConfig(MessageHeader):
    """A `train.fedmd` message: one fused FedMD round on a client.

    The paper digests 1 epoch of 5000 public samples at batch 256 (20 steps) with MAE on
    logits and revisits 2-10 epochs; scaled to ~450 public digits: 4 epochs at batch 32 (56
    steps), KL at T=3 (more accurate than MAE here, see the FedMD issue note), 1 revisit at a
    tenth of the learning rate (`revisit_lr`).
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("phase", "subset_round", "state_uri")

    phase: str = "round"  # "init": fine-tune the pretrained weights; "round": digest, revisit
    subset_round: int = 0  # the round whose public subset the reply's logits are on
    state_uri: str = ""  # where the client keeps its model between rounds
    pretrained_uri: str = ""  # where a client without a saved model finds `pretrained_key`'s
    digest_loss: str = "kl"  # "kl" (at `temperature`) or "mae" (the paper's code)
    digest_epochs: int = 4
    digest_batch_size: int = 32
    temperature: float = 3.0
    # Public labels in the digest: the loss mixes this share of cross-entropy on the subset's
    # labels (those among the consensus's classes, which the server sends) into the consensus
    # loss. At 0 (the paper's digest), on a public set cut from the private task, every round
    # after the first lost accuracy: the clients digest an average of each other's digests and
    # drift together (Fashion-MNIST, seed 1: 0.673 -> 0.657 over rounds 1-5; at 0.5,
    # 0.696 -> 0.753). A public set of another task has no label among the consensus's
    # classes: its digest is the paper's at any weight.
    digest_label_weight: float = 0.5
    revisit_epochs: int = 1
    # Revisiting fine-tunes a trained model on a small, label-skewed private set: at `lr`
    # (1e-3) one Adam epoch forgets the classes the client lacks and every round loses accuracy
    # (digits, 8 clients, alpha 0.5: 0.823 -> 0.724 revisiting alone); at 1e-4 it gains.
    revisit_lr: float = 1e-4
    finetune_epochs: int = 20  # init phase: at most this many epochs on private data...
    finetune_patience: int = 3  # ...stopping after this many without a held-out improvement
    batch_size: int = TrainConfig.batch_size  # private-data training (fine-tune, revisit)
    lr: float = TrainConfig.lr
    logits_dtype: str = TrainConfig.logits_dtype

    @staticmethod
    def pretrained_key(arch: str) -> str:
        """The state-store key of `arch`'s transfer-learned weights under `pretrained_uri`."""
        return f"pretrained-{arch}"


# -- where work runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConfig(FlatConfig):
    """Where training, logits, distillation and evaluation run (`flwr_kd.devices` resolves
    it): `device` "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps";
    `autocast` "" (off), "bf16" or "fp16". Every client message carries it (keys `device`,
    `autocast`); server tasks carry its two strings."""

    device: str = "auto"
    autocast: str = ""

    @classmethod
    def of(cls, value: DeviceConfig | str) -> DeviceConfig:
        """`value` itself, or the device it names, without autocast."""
        return value if isinstance(value, DeviceConfig) else cls(device=value)


# -- server tasks -----------------------------------------------------------------------------


#: Which weights server-side distillation hands back (`DistillConfig.selection`).
SELECTIONS = ("guard", "best", "last")


@dataclass(frozen=True)
class DistillConfig(FlatConfig):
    """Hyper-parameters of server-side distillation (paper: 1e4 steps, patience 1e3).

    `selection` says which weights distillation hands back (`flwr_kd.distill.SELECTIONS`):
    "guard" (default) runs all `steps` and keeps the result unless the server's validation set
    shows it significantly worse than the starting (FedAvg) model; "best" is the paper's early
    stopping (validate every `eval_every` steps, stop after `patience` without improvement,
    keep the best); "last" is plain FedDF (fixed steps, no validation). With validation sets
    of tens to hundreds of samples, "best" picks noise: it hands back the FedAvg model more
    often than it should and validates more than it distils (see benchmarks/REPORT.md).

    `center_teacher` subtracts each class's mean over the subset from the teacher's logits
    (`flwr_kd.distill.center_per_class`). Under label skew every client pushes the logits of
    classes it never saw far down, by different amounts, and the plain average inherits those
    leanings: its argmax favours a few classes (docs/evidence-lab.md).
    """

    PREFIX: ClassVar[str] = "distill-"

    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 1.0
    selection: str = "guard"
    eval_every: int = 10  # selection "best" only
    patience: int = 50  # selection "best": steps without a validation improvement before stopping
    center_teacher: bool = False


@dataclass(frozen=True)
class PretrainConfig(FlatConfig):
    """FedMD's transfer learning on the public labelled data (its fields key the cache)."""

    PREFIX: ClassVar[str] = "pretrain-"

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
