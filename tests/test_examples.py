"""The examples a Flower user copies, run as a user runs them, and the helpers they use.

- `examples/quickstart-feddf/` through a real `flwr run` (local SuperLink, Simulation Engine),
  2 rounds; a final model it saved, loaded with timm and PyTorch alone in a fresh interpreter,
  reproduces the accuracy the run reported;
- `examples/quickstart-fedmd/` on the in-process grid;
- `examples/serverless/`: its tfvars through the module's own validations (Terraform, without
  provider), its commands through flwr-kd's argument parser, and its end-to-end script against the
  emulated stack (about 90 s of CPU);
- `save_models` / `load_models` / `make_evaluate_fn`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from flwr.app import Context, RecordDict
from inprocess_grid import RUN_ID, InProcessGrid, node_id_of

from flwr_kd import load_models, make_evaluate_fn, protocol, save_models
from flwr_kd.configs import FedMDRoundConfig
from flwr_kd.models import ModelSpec, create_model, load_numpy_state, state_to_numpy
from flwr_kd.records import pack_models, unpack_models
from flwr_kd.superlink import CONNECTION, LocalSuperLink

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FEDDF, FEDMD, SERVERLESS = (
    EXAMPLES / n for n in ("quickstart-feddf", "quickstart-fedmd", "serverless")
)
BIN = Path(sys.executable).parent  # the virtual environment's bin/: flwr, flower-superlink
ARCHS = ["lcnet_050", "test_vit"]  # a MobileNet-like CNN and a ViT, the fastest of each family
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_config(example: Path, **overrides) -> dict:
    """The example's `[tool.flwr.app.config]`, with overrides (keys as in the file)."""
    with (example / "pyproject.toml").open("rb") as f:
        config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    unknown = set(overrides) - set(config)
    assert not unknown, f"not run-config keys of {example.name}: {unknown}"
    return {**config, **overrides}


def import_example(example: Path, module: str, monkeypatch):
    monkeypatch.syspath_prepend(str(example))
    return importlib.import_module(module)


# ------------------------------------------------------------------ quickstart-feddf: flwr run


def stop_tree(pid: int) -> None:
    """Stop a process and every process below it (SuperExec, simulation, Ray), by PID."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


FEDDF_RUN = {
    "num-server-rounds": 2,
    "local-epochs": 1,
    "batch-size": 32,
    "distill-steps": 10,
    "archs": ",".join(ARCHS),
}


@pytest.fixture(scope="module")
def feddf_flwr_run(tmp_path_factory):
    """`flwr run examples/quickstart-feddf` with 3 SuperNodes and 2 rounds, as the example's
    README says; returns (out dir, flwr's output)."""
    tmp = tmp_path_factory.mktemp("feddf-flwr-run")
    ray_tmp = Path(tempfile.mkdtemp(prefix="fkd-ray-"))  # Ray's socket paths must stay short
    # flwr-kd's own SuperLink (what `flwr-kd simulate` uses): waited for patiently (flwr gives
    # its `local` one 15 s and a 0.4 s probe: too little on 2 busy cores), reached by address
    # through the connection it writes in FLWR_HOME, and stopped with all it spawned, by PID.
    link = LocalSuperLink(tmp / "superlink")
    link.env.update(
        {
            "RAY_TMPDIR": str(ray_tmp),
            # one torch thread per process: tiny models on a busy 2-core machine ran rounds ten
            # times slower with two threads each (the ServerApp's and every ClientAppActor's)
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",  # scored on the CPU, as the plain-timm check scores
        }
    )
    out = tmp / "out"
    overrides = tmp / "overrides.toml"
    overrides.write_text(
        "".join(f"{k} = {json.dumps(v)}\n" for k, v in {**FEDDF_RUN, "out-dir": str(out)}.items())
    )
    try:
        with link:
            proc = subprocess.run(
                [BIN / "flwr", "run", str(FEDDF), CONNECTION]
                + ["--federation-config", "num-supernodes=3"]
                + ["--run-config", str(overrides), "--stream"],
                env=link.env,
                cwd=tmp,
                capture_output=True,
                check=False,
                text=True,
                timeout=900,
            )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert (out / "final_models" / "models.json").exists(), output
    return out, output


def test_feddf_server_app_shows_the_strategy_swap():
    source = (FEDDF / "quickstart_feddf" / "server_app.py").read_text()
    assert "FedDF(" in source and "strategy.start(" in source
    assert re.search(r"^\s*# strategy = FedAvg\(", source, re.MULTILINE)
    assert "evaluate_fn=make_evaluate_fn(" in source and "save_models(" in source


def test_feddf_example_runs_under_flwr_run(feddf_flwr_run):
    out, output = feddf_flwr_run
    assert "Successfully started run" in output
    history = json.loads((out / "metrics.json").read_text())["rounds"]
    assert sorted(history, key=int) == ["0", "1", "2"]  # the initial models, then 2 rounds
    for metrics in history.values():
        assert {f"accuracy/{a}" for a in ARCHS} | {"accuracy", "loss"} <= set(metrics)
        assert all(0.0 <= metrics[f"accuracy/{a}"] <= 1.0 for a in ARCHS)
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    manifest = json.loads((out / "final_models" / "models.json").read_text())
    assert list(manifest["models"]) == ARCHS
    for entry in manifest["models"].values():
        assert (out / "final_models" / entry["file"]).stat().st_size > 1000


#: Loads every saved model with timm and PyTorch alone and scores it on x, y.
PLAIN_TIMM_SCORE = """
import json, sys
import numpy as np, safetensors.torch, timm, torch
models_dir, data = sys.argv[1], np.load(sys.argv[2])
manifest = json.load(open(f"{models_dir}/models.json"))
x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
scores = {}
for name, entry in manifest["models"].items():
    model = timm.create_model(entry["architecture"], num_classes=entry["num_classes"],
                              in_chans=entry["in_chans"], **entry["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file(f"{models_dir}/{entry['file']}"))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    scores[name] = {"accuracy": float((logits.argmax(1) == y).float().mean()),
                    "loss": float(torch.nn.functional.cross_entropy(logits, y))}
assert not [m for m in sys.modules if m.split(".")[0] == "flwr_kd"], "flwr_kd was imported"
print(json.dumps(scores))
"""


def test_saved_models_reproduce_the_reported_accuracy_with_timm_alone(
    feddf_flwr_run, tmp_path, monkeypatch
):
    out, _ = feddf_flwr_run
    task = import_example(FEDDF, "quickstart_feddf.task", monkeypatch)
    data = task.load_server_data(run_config(FEDDF, **FEDDF_RUN))  # the user's own test set
    np.savez(tmp_path / "test.npz", x=data.test_x, y=data.test_y)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_TIMM_SCORE,
            str(out / "final_models"),
            str(tmp_path / "test.npz"),
        ],
        cwd=tmp_path,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    history = json.loads((out / "metrics.json").read_text())["rounds"]
    reported = history[max(history, key=int)]
    recorded = json.loads((out / "final_models" / "models.json").read_text())["metadata"]
    for arch in ARCHS:
        assert scores[arch]["accuracy"] == reported[f"accuracy/{arch}"]
        assert scores[arch]["accuracy"] == recorded["test_accuracy"][arch]
        assert scores[arch]["loss"] == pytest.approx(reported[f"loss/{arch}"], rel=1e-4)


def test_feddf_task_reads_a_hugging_face_dataset_through_federated_dataset(tmp_path, monkeypatch):
    """The `FederatedDataset` path of `task.py` (a hub id when online), here on a local
    directory of parquet files: RGB images in an `img` column, resized, partitioned."""
    import datasets
    from PIL import Image

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    for split, n in (("train", 200), ("test", 50)):
        images = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), np.uint8)) for _ in range(n)]
        labels = rng.integers(0, 10, n)
        table = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        table.to_parquet(str(tmp_path / "hub" / f"{split}.parquet"))
    task = import_example(FEDDF, "quickstart_feddf.task", monkeypatch)
    cfg = run_config(FEDDF, dataset=str(tmp_path / "hub"), alpha=0.0)
    server = task.load_server_data(cfg)
    assert server.model_spec == ModelSpec(num_classes=10, in_chans=3, img_size=16)
    assert server.test_x.shape == (50, 3, 16, 16) and server.public_x.shape == (50, 3, 16, 16)
    node = Context(RUN_ID, 5, {"partition-id": 1, "num-partitions": 4}, RecordDict(), cfg)
    client = task.load_client_data(node, None)
    assert client.model_spec == server.model_spec
    assert len(client.train_x) + len(client.holdout_x) == 35  # 140 private samples, IID over 4


# ------------------------------------------------------------- quickstart-fedmd: in process


@pytest.mark.usefixtures("server_task_identity")
def test_fedmd_example_runs_on_the_inprocess_grid(tmp_path, monkeypatch):
    client_app = import_example(FEDMD, "quickstart_fedmd.client_app", monkeypatch).app
    server_app = import_example(FEDMD, "quickstart_fedmd.server_app", monkeypatch).app
    out = tmp_path / "out"
    cfg = run_config(
        FEDMD,
        **{"num-server-rounds": 1, "archs": ",".join(ARCHS), "subset-size": 100},
        **{"pretrain-epochs": 1, "finetune-epochs": 1, "digest-epochs": 1},
        **{"out-dir": str(out), "cache-dir": str(tmp_path / "cache")},
    )
    grid = InProcessGrid(client_app, 3, run_config=cfg)
    server_app(grid, Context(RUN_ID, 0, {}, RecordDict(), cfg))

    history = json.loads((out / "metrics.json").read_text())["rounds"]
    assert list(history) == ["0", "1"]  # after transfer learning and fine-tuning; one round
    for metrics in history.values():  # the nodes' own test accuracy, per architecture
        assert set(metrics) == {f"accuracy/{a}" for a in ARCHS}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    nodes = {f"node-{node_id_of(p)}": ARCHS[p % len(ARCHS)] for p in range(3)}
    # weights went out once (the transfer-learned ones) and never came back: only logits did
    sent = [m for m in grid.messages_of(protocol.FEDMD_ROUND) if protocol.ARRAYS in m.content]
    assert len(sent) == 3 and not [r for r in grid.replies if protocol.ARRAYS in r.content]
    # the models stayed with their nodes: each node's store (beside each architecture's
    # transfer-learned weights, from which a node without a model rejoins), and transfer
    # learning's cache
    published = [FedMDRoundConfig.pretrained_key(a) for a in ARCHS]
    stored = sorted(p.stem for p in (out / "client_state").glob("*.npz"))
    assert stored == sorted([*nodes, *published])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == len(ARCHS)
    manifest = json.loads((out / "client_models" / "models.json").read_text())
    assert {n: e["architecture"] for n, e in manifest["models"].items()} == nodes
    assert set(load_models(out / "client_models")) == set(nodes)


# ----------------------------------------------------------------------------- serverless


def test_serverless_tfvars_pass_the_modules_validations(tmp_path):
    """Terraform itself evaluates variables.tf (and the locals its validations use) on the
    example's tfvars, as `terraform apply` would before creating anything."""
    terraform = shutil.which("terraform") or "/usr/local/bin/terraform"
    module = tmp_path / "terraform"
    module.mkdir()
    for name in ("variables.tf", "locals.tf"):
        shutil.copy(ROOT / "terraform" / name, module / name)
    for name in ("cloud", "flwr_kd"):  # locals.tf lists the function sources beside it
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    (module / "probe.tf").write_text(
        'output "deployment" {\n  value = { clients = var.clients, archs = var.architectures }\n}\n'
    )
    (tmp_path / "tf.rc").write_text("")
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "TF_INPUT": "0"}
    env["TF_CLI_CONFIG_FILE"] = str(tmp_path / "tf.rc")
    tfvars = SERVERLESS / "terraform.tfvars"
    for args in (
        ["fmt", "-check", "-diff", str(tfvars)],
        ["init", "-backend=false", "-input=false", "-no-color"],
        ["apply", "-auto-approve", "-input=false", "-no-color", f"-var-file={tfvars}"],
    ):
        proc = subprocess.run(
            [terraform, *args],
            cwd=module,
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(
        [terraform, "output", "-json", "deployment"],
        cwd=module,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    deployment = json.loads(proc.stdout)
    assert len(deployment["clients"]) == 4  # what the README's `--clients 4` says
    assert {c["architecture"] for c in deployment["clients"].values()} == set(deployment["archs"])


def flwr_kd_commands(text: str) -> list[list[str]]:
    """Every `flwr-kd ...` command line in a README or shell script, as argv: continuations
    joined; comments, redirections and `"$@"` dropped; shell variables become `x`."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.split(r"\s(?:#|\d?>|<|\||&)", line.strip())[0]
        match = re.match(r"^(?:\$FLWR_KD|(?:\S*/)?flwr-kd)\s+(.*)$", line)
        if match:
            argv = [a for a in shlex.split(match.group(1)) if a != "$@"]
            commands.append(["x" if a.startswith("$") else a for a in argv])
    return commands


def test_serverless_commands_are_ones_flwr_kd_accepts():
    from flwr_kd.cli import _parser

    commands = []
    for name in ("README.md", "run_emulated.sh"):
        commands += flwr_kd_commands((SERVERLESS / name).read_text())
    verbs = {tuple(c[:2]) for c in commands}
    assert {
        ("cloud", "run"),
        ("cloud", "audit"),
        ("cloud", "emulate"),
        ("cloud", "emulators"),
    } <= verbs
    assert any("--resume" in c for c in commands)
    for argv in commands:
        _parser().parse_args(argv)


def test_serverless_example_runs_end_to_end_on_the_emulated_stack(tmp_path):
    out = tmp_path / "out"
    argv = [SERVERLESS / "run_emulated.sh", str(out), "--clients", "3", "--archs", ",".join(ARCHS)]
    argv += ["--local-epochs", "1", "--distill-steps", "5", "--no-baseline"]
    argv += ["-c", "max-private=80", "-c", "subset-size=100"]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: stopped whole if it hangs
    )
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        stop_tree(proc.pid)  # on a timeout, the script, its emulators and functions
    assert proc.returncode == 0, output
    assert "records complete" in output
    result = json.loads((out / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2]


# ------------------------------------------------------------------ the helpers they use


@pytest.fixture(scope="module")
def two_models():
    spec = ModelSpec(num_classes=10, in_chans=1, img_size=16)
    torch.manual_seed(0)
    arrays = pack_models({a: state_to_numpy(create_model(a, spec)) for a in ARCHS})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 16, 16)).astype(np.float32)
    return spec, arrays, x, rng.integers(0, 10, 40)


def test_evaluate_fn_scores_every_architecture(two_models):
    spec, arrays, x, y = two_models
    metrics = make_evaluate_fn(x, y, spec)(3, arrays)
    assert set(metrics) == {"accuracy", "loss"} | {
        f"{m}/{a}" for m in ("accuracy", "loss") for a in ARCHS
    }
    assert metrics["accuracy"] == pytest.approx(np.mean([metrics[f"accuracy/{a}"] for a in ARCHS]))
    only = make_evaluate_fn(x, y, spec, archs=["test_vit"])(3, arrays)
    assert (
        only["accuracy/test_vit"] == metrics["accuracy/test_vit"] and "loss/lcnet_050" not in only
    )


def test_saved_models_load_back_identical(two_models, tmp_path):
    spec, arrays, x, _ = two_models
    save_models(arrays, spec, tmp_path, metadata={"note": "hi"})
    manifest = json.loads((tmp_path / "models.json").read_text())
    assert manifest["metadata"] == {"note": "hi"}
    assert manifest["models"]["test_vit"]["timm_kwargs"] == {"img_size": 16, "patch_size": 4}
    assert manifest["models"]["lcnet_050"]["timm_kwargs"] == {}
    loaded, states = load_models(tmp_path), unpack_models(arrays)
    for arch in ARCHS:
        reference = create_model(arch, spec).eval()
        load_numpy_state(reference, states[arch])
        with torch.no_grad():
            assert torch.equal(loaded[arch](torch.from_numpy(x)), reference(torch.from_numpy(x)))


def test_save_models_names_models_by_name_and_architecture(two_models, tmp_path):
    spec, arrays, _, _ = two_models
    states = unpack_models(arrays)
    save_models(
        {"client-7": states["test_vit"]}, spec, tmp_path, architectures={"client-7": "test_vit"}
    )
    assert (
        json.loads((tmp_path / "models.json").read_text())["models"]["client-7"]["architecture"]
        == "test_vit"
    )
    with pytest.raises(ValueError, match="file name"):
        save_models({"../up": states["test_vit"]}, spec, tmp_path)
    with pytest.raises(ValueError, match="does not fit"):
        save_models({"resnet10t": states["test_vit"]}, spec, tmp_path)
