"""An experiment's configuration: Flower run-config keys, defaults, and their validation.

The same keys configure `flwr run examples/quickstart` (`[tool.flwr.app.config]`),
`flwr-kd simulate` (its flags) and the serverless driver. Validation happens before anything
runs or is written, and names the offending key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from flwr_kd.configs import (
    SELECTIONS,
    DeviceConfig,
    DistillConfig,
    FedMDRoundConfig,
    PretrainConfig,
    TrainConfig,
)
from flwr_kd.data import DataSpec
from flwr_kd.devices import Compute, DeviceError
from flwr_kd.faults import parse_kinds
from flwr_kd.models import DEFAULT_ARCHITECTURES, check_architecture
from flwr_kd.registry import STRATEGIES
from flwr_kd.tracking import check_tracker  # the strategy names, from what the runner can build

#: Run-config keys whose value is one of a few names.
CHOICES = {
    "teacher": ("clients", "server"),
    "logits_dtype": ("float16", "float32"),
    "digest_loss": ("mae", "kl"),
    "distill_selection": SELECTIONS,
    "fanout": ("process", "serial"),
}


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key."""


@dataclass(frozen=True)
class ExperimentConfig:
    strategy: str = "feddf"
    dataset: str = "digits"
    num_clients: int = 8
    alpha: float = 0.5  # 0 means IID
    # How private data is split over clients, and the image size (flwr_kd.dataspec.DataSpec)
    partitioner: str = DataSpec.partitioner
    shards_per_client: int = DataSpec.shards_per_client
    classes_per_client: int = DataSpec.classes_per_client
    img_size: int = DataSpec.img_size
    seed: int = 0
    num_server_rounds: int = 5
    archs: str = ",".join(DEFAULT_ARCHITECTURES)
    # Defaults of client and server-task settings come from their typed configs (flwr_kd.configs).
    local_epochs: int = TrainConfig.local_epochs
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    distill_steps: int = DistillConfig.steps
    distill_batch_size: int = DistillConfig.batch_size
    distill_lr: float = DistillConfig.lr
    distill_selection: str = DistillConfig.selection  # "guard", "best" (early stopping), "last"
    distill_eval_every: int = DistillConfig.eval_every
    distill_patience: int = DistillConfig.patience
    distill_center_teacher: bool = DistillConfig.center_teacher
    temperature: float = DistillConfig.temperature
    subset_size: int = 0  # public samples per round; 0 means all
    teacher: str = "clients"
    logits_dtype: str = TrainConfig.logits_dtype
    fanout: str = "process"
    # FedMD (why these defaults: FedMDRoundConfig's docstring)
    pretrain_epochs: int = PretrainConfig.epochs
    finetune_epochs: int = FedMDRoundConfig.finetune_epochs
    digest_epochs: int = FedMDRoundConfig.digest_epochs
    digest_batch_size: int = FedMDRoundConfig.digest_batch_size
    digest_loss: str = FedMDRoundConfig.digest_loss
    digest_temperature: float = FedMDRoundConfig.temperature
    digest_label_weight: float = FedMDRoundConfig.digest_label_weight
    revisit_epochs: int = FedMDRoundConfig.revisit_epochs
    revisit_lr: float = FedMDRoundConfig.revisit_lr
    # Reliability: a round needs `min-replies` valid replies; `round-timeout` (seconds, 0:
    # Flower's default of 3600) cuts stragglers; `fail-*` inject faults (see flwr_kd.faults).
    min_replies: int = 2
    round_timeout: float = 0.0
    fail_rate: float = 0.0
    fail_kinds: str = ""
    fail_hang_seconds: float = 10.0
    measure_pretrain_per_client: bool = False
    cache_dir: str = ""
    max_private: int = 0
    max_test: int = 0
    # The server's labelled validation set (FedDF's early stopping) holds at most this share of
    # the private pool's size: it must not see more labels than the clients hold.
    max_val_fraction: float = 0.1
    public_fraction: float = 0.25
    # FedMD's own regime: public labelled data from another task (flwr_kd.dataspec.DataSpec)
    public_dataset: str = DataSpec.public_dataset
    public_classes_from: int = DataSpec.public_classes_from
    local_only_baseline: bool = True
    out_dir: str = ""
    track: str = ""  # experiment tracking: "" (off) or "mlflow" (flwr_kd.tracking)
    # Devices: "auto" picks cuda, then mps, then cpu, for every training, logits, distillation
    # and evaluation path; "cpu", "cuda", "cuda:1", "mps" force one. `autocast`: "" (off),
    # "bf16" or "fp16" mixed precision. Ray resources per simulated client (Flower's
    # backend config `client_resources`): CPUs and a GPU fraction.
    device: str = DeviceConfig.device
    autocast: str = DeviceConfig.autocast
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    # Simulation only: index Flower's in-memory LinkState by node, so that its engine's poll of
    # every node costs what the pending messages cost (flwr_kd.simulation_poll).
    poll_index: bool = True

    # -- conversions ------------------------------------------------------------------------

    @classmethod
    def from_run_config(cls, run_config: dict) -> ExperimentConfig:
        """From Flower run-config keys (kebab-case); unknown keys are an error."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            if key not in known:
                raise ConfigError(
                    f"unknown run-config key '{key}'; known: {', '.join(sorted(known))}"
                )
            field = known[key]
            try:
                values[field.name] = _coerce(field.type, value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"run-config '{key}' must be {field.type}, got {value!r}"
                ) from None
        config = cls(**values)
        config.validate()
        return config

    def to_run_config(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def arch_list(self) -> list[str]:
        return [a.strip() for a in self.archs.split(",") if a.strip()]

    @property
    def device_config(self) -> DeviceConfig:
        """Where the run's clients and server tasks train, infer and evaluate."""
        return DeviceConfig(device=self.device, autocast=self.autocast)

    def arch_of_partition(self, partition_id: int) -> str:
        archs = self.arch_list
        return archs[partition_id % len(archs)]

    @property
    def data_spec(self) -> DataSpec:
        """The split: DataSpec's fields of the same names, over `num-clients` clients."""
        shared = {
            f.name: getattr(self, f.name)
            for f in fields(DataSpec)
            if f.name != "alpha" and hasattr(self, f.name)
        }
        return DataSpec(**shared, num_partitions=self.num_clients, alpha=self.alpha or None)

    @property
    def local_budget_epochs(self) -> int:
        """Private-data epochs one client gets in the federated run (the local-only budget)."""
        if self.strategy == "fedmd":
            return self.finetune_epochs + self.num_server_rounds * self.revisit_epochs
        return self.num_server_rounds * self.local_epochs

    @property
    def pretrain_config(self) -> PretrainConfig:
        """FedMD's transfer learning: `pretrain-epochs` at the run's `lr` and `seed`."""
        return PretrainConfig(epochs=self.pretrain_epochs, lr=self.lr, seed=self.seed)

    @property
    def train_config(self) -> TrainConfig:
        """The settings of every `train` message (the strategy adds each one's header): the
        run-config keys of the same names (`local-epochs`, `batch-size`, `lr`, `logits-dtype`)."""
        return TrainConfig.from_config(self.to_run_config())

    @property
    def distill_config(self) -> DistillConfig:
        """FedDF's server-side distillation: the `distill-*` keys and `temperature`."""
        return DistillConfig(
            steps=self.distill_steps,
            batch_size=self.distill_batch_size,
            lr=self.distill_lr,
            temperature=self.temperature,
            selection=self.distill_selection,
            eval_every=self.distill_eval_every,
            patience=self.distill_patience,
            center_teacher=self.distill_center_teacher,
        )

    def client_config(self) -> dict:
        """What every message carries so that a stateless client can rebuild its data (and
        knows its device)."""
        return {
            **self.data_spec.to_config(),
            "archs": self.archs,
            **self.train_config.settings(),
            **self.device_config.to_config(),
            **(
                {
                    "fail-rate": self.fail_rate,
                    "fail-kinds": self.fail_kinds,
                    "fail-hang-seconds": self.fail_hang_seconds,
                }
                if self.fail_rate > 0
                else {}
            ),
        }

    # -- validation -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError (or DataError / UnknownArchitectureError) naming the problem."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy '{self.strategy}': choose one of {', '.join(STRATEGIES)}"
            )
        self.data_spec  # noqa: B018 - DataSpec validates clients, alpha and dataset name
        if self.alpha < 0:
            raise ConfigError(f"alpha must be > 0 (or 0 for IID), got {self.alpha}")
        if self.num_server_rounds < 1:
            raise ConfigError(f"num-server-rounds must be at least 1, got {self.num_server_rounds}")
        if not self.arch_list:
            raise ConfigError("archs is empty: give timm model names separated by commas")
        for arch in self.arch_list:
            check_architecture(arch)
        positive = (
            "local_epochs",
            "batch_size",
            "distill_batch_size",
            "distill_steps",
            "distill_eval_every",
            "distill_patience",
            "pretrain_epochs",
            "finetune_epochs",
            "digest_epochs",
            "digest_batch_size",
            "revisit_epochs",
        )
        for name in positive:
            if getattr(self, name) < (0 if name in ("distill_steps", "revisit_epochs") else 1):
                raise ConfigError(f"{name.replace('_', '-')} must be positive")
        if not 0 <= self.digest_label_weight <= 1:
            raise ConfigError(
                f"digest-label-weight must lie in [0, 1], got {self.digest_label_weight}"
            )
        if not 0 < self.max_val_fraction <= 1:
            raise ConfigError(f"max-val-fraction must lie in (0, 1], got {self.max_val_fraction}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must lie in (0, 1], got {self.fraction_train}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                    f"got '{getattr(self, name)}'"
                )
        if not 1 <= self.min_replies <= self.num_clients:
            raise ConfigError(f"min-replies must lie in [1, num-clients], got {self.min_replies}")
        if not 0 <= self.fail_rate <= 1:
            raise ConfigError(f"fail-rate must lie in [0, 1], got {self.fail_rate}")
        try:
            parse_kinds(self.fail_kinds)
        except ValueError as exc:
            raise ConfigError(f"fail-kinds: {exc}") from None
        if self.fail_hang_seconds < 0 or self.round_timeout < 0:
            raise ConfigError("fail-hang-seconds and round-timeout must not be negative")
        if self.track:
            try:
                check_tracker(self.track)
            except (ValueError, ImportError) as exc:
                raise ConfigError(f"track: {exc}") from None
        self._validate_devices()

    def _validate_devices(self) -> None:
        """The device exists on this machine (where clients and server tasks run too, for
        `flwr-kd simulate`), and Ray can grant the client resources."""
        try:
            Compute.of(self.device_config)  # the device must exist here
        except DeviceError as exc:
            raise ConfigError(str(exc)) from None
        if self.client_num_cpus <= 0:
            raise ConfigError(f"client-num-cpus must be positive, got {self.client_num_cpus}")
        gpus = self.client_num_gpus
        if gpus < 0 or (gpus > 1 and not gpus.is_integer()):
            raise ConfigError(
                f"client-num-gpus must be a fraction of one GPU or a whole number, got {gpus}"
            )


def _coerce(type_name, value):
    kind = type_name if isinstance(type_name, str) else type_name.__name__
    if kind == "bool":
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return bool(value)
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind == "float":
        return float(value)
    return str(value)
