"""Where models run: one resolver for every training, logits, distillation and evaluation call.

A run names its device once (`flwr_kd.configs.DeviceConfig`: `device` "auto", "cpu", "cuda",
"cuda:N" or "mps"; `autocast` "", "bf16" or "fp16"). Each training or inference call resolves
it to a `Compute` where it runs (a client, a fan-out worker, the server), moves its model there
and its batches one at a time: data stays numpy on the host and results come back as numpy on
the CPU, so no other code needs to know the device. "auto" on a machine without CUDA or MPS is
the CPU without autocast: bit for bit what ran before devices existed.

`record_phase` notes where each phase ran in the file that `FLWR_KD_PHASE_LOG` names, from
any process (clients, fan-out workers); `make gpu-check` reads it back with `read_phase_log`.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from flwr_kd.configs import DeviceConfig

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
PHASE_LOG_ENV = "FLWR_KD_PHASE_LOG"
_preferred_cuda_index: int | None = None  # a fan-out worker's GPU (prefer_cuda_index)


class DeviceError(ValueError):
    """A `device` or `autocast` value this machine cannot run; the message names the key."""


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def prefer_cuda_index(index: int | None) -> None:
    """Make "auto" and "cuda" mean `cuda:<index>` in this process (None: the current CUDA
    device): how the process fan-out spreads its workers over GPUs. "cuda:N" still wins."""
    global _preferred_cuda_index
    _preferred_cuda_index = index


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device `name` means on this machine: "auto" is cuda when available, then
    mps, else cpu. Raises DeviceError for an unknown name or a device this machine lacks."""
    name = name.strip().lower() or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device '{name}' is not one of auto, cpu, cuda, cuda:N, mps")
    if device.type == "mps" and not mps_available():
        raise DeviceError("device 'mps' is not available here; use --device auto or cpu")
    return _cuda(device) if device.type == "cuda" else device


def _cuda(device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device '{device}': no CUDA device here (torch.cuda.is_available() is False); "
            "use --device auto or cpu"
        )
    count = torch.cuda.device_count()
    if device.index is None and _preferred_cuda_index is not None:
        return torch.device("cuda", _preferred_cuda_index % count)
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device '{device}': this machine has {count} CUDA device(s)")
    return device


@dataclass(frozen=True)
class Compute:
    """A `DeviceConfig` resolved on this machine: the device and autocast dtype of one
    training, logits, distillation or evaluation call."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, config: DeviceConfig) -> Compute:
        """Raises DeviceError if this machine cannot run `config`."""
        if config.autocast not in AUTOCAST_DTYPES:
            raise DeviceError(f"autocast must be one of '', bf16, fp16; got '{config.autocast}'")
        device = resolve_device(config.device)
        dtype = AUTOCAST_DTYPES[config.autocast]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("autocast 'bf16': this GPU has no bfloat16; use fp16")
        return cls(device, dtype)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch on the device (a plain copy: pageable host memory gains nothing from
        non_blocking). float64 becomes float32, which every device has (mps has no float64)."""
        return (tensor.float() if tensor.dtype == torch.float64 else tensor).to(self.device)

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for forward passes and losses, if the config asks for it."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def adam(self, model: torch.nn.Module, lr: float) -> torch.optim.Adam:
        """Adam over `model`'s parameters, fused into one kernel where PyTorch has one (CPU and
        CUDA): the default's per-parameter loop costs a large share of a step of the small
        models here (resnet10t at batch 16 on one CPU thread: 90 -> 62 ms a step,
        benchmarks/results/full/cpu_kernels.json)."""
        return torch.optim.Adam(
            model.parameters(), lr=lr, fused=self.device.type in ("cpu", "cuda")
        )

    def stepper(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        """`step(loss)`: clear the gradients, backpropagate, step. Under fp16 on CUDA the loss
        is scaled (GradScaler) so that small gradients do not underflow."""
        fp16 = self.autocast_dtype == torch.float16 and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if fp16 else None

        def step(loss: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
                return
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return step


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def has_depthwise_convolutions(model: torch.nn.Module) -> bool:
    """Whether `model` convolves each channel on its own somewhere (MobileNets, LCNet,
    EfficientNets): oneDNN runs those several times faster on channels-last tensors."""
    return any(
        isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        for m in model.modules()
    )


def run_on(model: torch.nn.Module, config: DeviceConfig | None) -> Compute:
    """Where a call on `model` runs: `config` resolved here, the model moved there (in place);
    without a config, where the model already is, without autocast. On the CPU, a model with
    depthwise convolutions also takes the channels-last memory format (same values, other
    strides): mobilenetv3_small_050 trains 1.3x faster at batch 16 and 1.8x at 64 on one
    thread, while a plain ResNet gains nothing (benchmarks/results/full/cpu_kernels.json)."""
    compute = Compute(model_device(model)) if config is None else Compute.of(config)
    model.to(compute.device)
    if compute.device.type == "cpu" and has_depthwise_convolutions(model):
        model.to(memory_format=torch.channels_last)
    return compute


# -- the phase log (make gpu-check's evidence) -------------------------------------------------


def record_phase(phase: str, model: torch.nn.Module, samples: int, started: float) -> None:
    """Append that `phase` ran `samples` samples on the model's device since `started`
    (`time.perf_counter()`) to the file `FLWR_KD_PHASE_LOG` names; nothing when it is unset."""
    path = os.environ.get(PHASE_LOG_ENV)
    if not path:
        return
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the time of the work, not of its launch
    line = f"{phase}\t{device}\t{samples}\t{time.perf_counter() - started:.6f}\n"
    with open(path, "a", encoding="utf-8") as f:  # one short append: whole lines across processes
        f.write(line)


def read_phase_log(path: str | Path) -> dict[str, dict[str, tuple[int, float]]]:
    """phase -> device -> (samples, seconds), summed over every call in every process."""
    totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    for line in text.splitlines():
        phase, device, samples, seconds = line.split("\t")
        entry = totals[phase][device]
        entry[0] += int(samples)
        entry[1] += float(seconds)
    return {
        phase: {device: (int(s), sec) for device, (s, sec) in by_device.items()}
        for phase, by_device in totals.items()
    }
