"""Devices on a CPU-only machine: the resolver, config validation, the phase log, runs with
`--device cpu` and `--device auto`, the CPU path of `make gpu-check`, and progress bars that
stay out of captured output."""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.clientapp import ClientApp
from inprocess_grid import InProcessGrid

from flwr_kd import devices
from flwr_kd.cli import _parser, config_from_args
from flwr_kd.client import KDClient
from flwr_kd.configs import DeviceConfig
from flwr_kd.devices import (
    PHASE_LOG_ENV,
    Compute,
    DeviceError,
    read_phase_log,
    record_phase,
    resolve_device,
)
from flwr_kd.experiment import ConfigError, ExperimentConfig
from flwr_kd.fanout import ProcessFanOut, SerialFanOut, _init_worker
from flwr_kd.models import ModelSpec, create_model, state_to_numpy
from flwr_kd.runner import run_experiment
from flwr_kd.tasks import LocalTrainTask, run_local_train_task
from flwr_kd.training import predict_logits, train_supervised

ROOT = Path(__file__).resolve().parents[1]
PHASES = {"training", "logits", "distillation", "evaluation"}


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as it is (no CUDA, no MPS), also where the suite runs on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that says it has two CUDA devices (nothing touches them: devices only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(devices, "_preferred_cuda_index", None)


def test_auto_picks_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if devices.mps_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("").type == expected
    assert resolve_device("CPU") == torch.device("cpu")


def test_auto_is_the_cpu_here(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert Compute.of(DeviceConfig()) == Compute(torch.device("cpu"), None)


@pytest.mark.parametrize(
    ("run_config", "named"),
    [
        ({"device": "cuda"}, "no CUDA device"),
        ({"device": "cuda:1"}, "no CUDA device"),
        ({"device": "mps"}, "device 'mps' is not available"),
        ({"device": "tpu"}, "device 'tpu' is not one of"),
        ({"device": "meta"}, "device 'meta' is not one of"),
        ({"autocast": "fp8"}, "autocast must be one of"),
        ({"client-num-cpus": 0}, "client-num-cpus"),
        ({"client-num-gpus": -1}, "client-num-gpus"),
        ({"client-num-gpus": 1.5}, "client-num-gpus"),
    ],
)
def test_bad_device_settings_are_config_errors_naming_the_key(no_gpu, run_config, named):
    with pytest.raises(ConfigError, match=named):
        ExperimentConfig.from_run_config(run_config)


def test_cli_device_without_cuda_exits_2_with_one_line(no_gpu, tmp_path, capsys):
    from flwr_kd.cli import main

    assert main(["simulate", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flwr-kd: error: device 'cuda': no CUDA device here")
    assert "\n" not in err and not (tmp_path / "out").exists()


def test_cuda_names_resolve_where_there_is_cuda(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_fanout_workers_take_the_gpus_round_robin(two_gpus):
    """What `ProcessFanOut` runs in each new worker: worker i prefers cuda:<i mod 2> for
    "auto" and "cuda"; an explicit index still wins."""
    started = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    for _ in range(3):
        _init_worker(torch.get_num_threads(), 2, started)
        seen.append((resolve_device("auto"), resolve_device("cuda"), resolve_device("cuda:0")))
    cuda = torch.device
    assert seen == [
        (cuda("cuda", 0), cuda("cuda", 0), cuda("cuda", 0)),
        (cuda("cuda", 1), cuda("cuda", 1), cuda("cuda", 0)),
        (cuda("cuda", 0), cuda("cuda", 0), cuda("cuda", 0)),
    ]


def test_messages_carry_the_runs_device():
    config = ExperimentConfig(device="cpu", autocast="bf16").client_config()
    assert (config["device"], config["autocast"]) == ("cpu", "bf16")
    assert DeviceConfig.from_config(config) == DeviceConfig("cpu", "bf16")
    assert DeviceConfig.from_config({}) == DeviceConfig("auto", "")


def test_phase_log_sums_calls_by_phase_and_device(tmp_path, monkeypatch):
    model = create_model("test_vit", ModelSpec(num_classes=3, in_chans=1, img_size=16))
    record_phase("training", model, 5, 0.0)  # no log named: nothing written, nothing fails
    log = tmp_path / "phases.log"
    monkeypatch.setenv(PHASE_LOG_ENV, str(log))
    x = np.random.default_rng(0).normal(size=(6, 1, 16, 16)).astype(np.float32)
    y = np.arange(6) % 3
    train_supervised(model, x, y, epochs=2, batch_size=3)
    predict_logits(model, x)
    phases = read_phase_log(log)
    assert {p: {d: s for d, (s, _) in by.items()} for p, by in phases.items()} == {
        "training": {"cpu": 12},
        "logits": {"cpu": 6},
    }


def test_bf16_autocast_trains_on_cpu():
    model = create_model("test_vit", ModelSpec(num_classes=3, in_chans=1, img_size=16))
    x = np.random.default_rng(0).normal(size=(8, 1, 16, 16))  # float64: becomes float32
    y = np.arange(8) % 3
    device = DeviceConfig("cpu", "bf16")
    loss = train_supervised(model, x, y, epochs=1, batch_size=4, device=device)
    logits = predict_logits(model, x, device)
    assert np.isfinite(loss) and logits.dtype == np.float32 and logits.shape == (8, 3)


def _tiny_run(device: str, tmp_path: Path) -> dict:
    args = _parser().parse_args(
        [
            "simulate",
            "--device",
            device,
            "--clients",
            "2",
            "--rounds",
            "1",
            "--archs",
            "test_vit",
            "--local-epochs",
            "1",
            "--distill-steps",
            "2",
            "--fanout",
            "serial",
            "--no-baseline",
            "--out",
            str(tmp_path / device),
            "-c",
            "max-private=40",
            "-c",
            "max-test=40",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.device == device
    return run_experiment(InProcessGrid(KDClient().register(ClientApp()), 2), cfg)


def test_device_cpu_and_auto_run_the_same_experiment_on_the_cpu(
    no_gpu, tmp_path, monkeypatch, server_task_identity
):
    """`--device cpu` and `--device auto` (the default) both run, every phase on the CPU, and
    give the same numbers: auto is the CPU here, and the CPU path is the one of before."""
    log = tmp_path / "phases.log"
    monkeypatch.setenv(PHASE_LOG_ENV, str(log))
    cpu = _tiny_run("cpu", tmp_path)
    auto = _tiny_run("auto", tmp_path)
    assert [r["accuracy"] for r in cpu["rounds"]] == [r["accuracy"] for r in auto["rounds"]]
    assert cpu["initial"]["accuracy"] == auto["initial"]["accuracy"]
    phases = read_phase_log(log)
    assert PHASES <= set(phases)
    assert {device for by in phases.values() for device in by} == {"cpu"}


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_exits_nonzero_saying_why(no_gpu, capsys):
    assert _gpu_check().main([]) == 2
    assert "no CUDA device: make gpu-check needs an NVIDIA GPU" in capsys.readouterr().err


def test_gpu_check_cpu_path_checks_every_phase(no_gpu, capsys):
    """The script's own path on the CPU (`--device cpu --allow-cpu`), tiny and serial (the
    next test shows that the process fan-out's workers write to the log as well)."""
    tiny = ["--clients", "2", "--rounds", "1", "--archs", "test_vit", "--fanout", "serial"]
    tiny += ["--local-epochs", "1", "--distill-steps", "2", "--max-private", "40"]
    assert _gpu_check().main(["--device", "cpu", "--allow-cpu", *tiny]) == 0
    out = capsys.readouterr().out
    assert "OK: training, logits, distillation, evaluation all ran on cpu only" in out
    for phase in PHASES:
        assert f"\n{phase}" in out


def test_fanout_workers_write_to_the_phase_log(tmp_path, monkeypatch):
    """Spawned workers inherit `FLWR_KD_PHASE_LOG`: their training and evaluation reach it."""
    log = tmp_path / "phases.log"
    monkeypatch.setenv(PHASE_LOG_ENV, str(log))
    spec = ModelSpec(num_classes=3, in_chans=1, img_size=16)
    x = np.random.default_rng(0).normal(size=(8, 1, 16, 16)).astype(np.float32)
    y = np.arange(8) % 3
    task = LocalTrainTask("test_vit", spec, x, y, x[:4], y[:4], epochs=1, batch_size=4)
    with ProcessFanOut(max_workers=1) as fanout:
        fanout.map(run_local_train_task, [task, task])
    phases = read_phase_log(log)
    assert phases["training"]["cpu"][0] == 16 and phases["evaluation"]["cpu"][0] == 8


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_on_a_terminal_only(monkeypatch, capsys):
    SerialFanOut().map_with_progress(abs, [-1, -2], "local-only baseline")
    assert capsys.readouterr().err == ""  # captured stderr is no terminal: no bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert SerialFanOut().map_with_progress(abs, [-1, -2], "local-only baseline") == [1, 2]
    assert "local-only baseline" in terminal.getvalue()


def test_the_cpu_runs_models_with_depthwise_convolutions_channels_last(no_gpu):
    """Channels-last changes the strides, not the values: the same weights give the same
    logits, and saved weights come back as plain C-ordered arrays."""
    spec = ModelSpec(num_classes=10, in_chans=1, img_size=16)
    x = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    for arch, depthwise in (("mobilenetv3_small_050", True), ("resnet10t", False)):
        torch.manual_seed(0)
        model, reference = create_model(arch, spec), create_model(arch, spec)
        reference.load_state_dict(model.state_dict())
        assert devices.has_depthwise_convolutions(model) is depthwise
        stem, seen = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), []
        stem.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.is_contiguous()))
        logits = predict_logits(model, x, DeviceConfig(device="cpu"))
        assert seen == [not depthwise]  # channels-last activations: not NCHW-contiguous
        reference.eval()
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
        assert all(v.flags["C_CONTIGUOUS"] for v in state_to_numpy(model).values())
