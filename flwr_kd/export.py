"""Final models as files that a plain timm + PyTorch user loads without flwr-kd.

A run ends with one model per architecture (FedDF, FedAvg per group) or per client (FedMD).
`save_models` writes each as `<name>.safetensors` beside `models.json`, which names the timm
architecture and the keyword arguments that rebuild it; nothing in the files needs flwr-kd:

    import json, safetensors.torch, timm
    entry = json.load(open("final_models/models.json"))["models"]["resnet10t"]
    model = timm.create_model(entry["architecture"], num_classes=entry["num_classes"],
                              in_chans=entry["in_chans"], **entry["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("final_models/" + entry["file"]))

`load_models` does exactly that for every entry.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import timm
import torch
from flwr.app import ArrayRecord
from safetensors.numpy import save_file
from safetensors.torch import load_file

from flwr_kd.models import ModelSpec, vit_kwargs
from flwr_kd.records import State, unpack_models

MANIFEST = "models.json"
FORMAT = "flwr-kd.models/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

Models = ArrayRecord | Mapping[str, State]


def as_state_dicts(models: Models) -> dict[str, State]:
    """State dicts by name, from a global `ArrayRecord` (keyed `"<arch>/<parameter>"`, see
    `flwr_kd.records.pack_models`) or from a mapping of state dicts (returned as a copy)."""
    if isinstance(models, ArrayRecord):
        return unpack_models(models)
    return {name: dict(state) for name, state in models.items()}


def _shapes(state: Mapping) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def _timm_kwargs(arch: str, spec: ModelSpec, state: State) -> dict[str, int]:
    """The keyword arguments besides classes and channels under which plain timm builds
    `arch` with exactly `state`'s parameters: `create_model`'s ViT sizing, or none."""
    for extra in (vit_kwargs(spec), {}):
        try:
            model = timm.create_model(
                arch, num_classes=spec.num_classes, in_chans=spec.in_chans, **extra
            )
        except TypeError:  # convolutional nets reject img_size and patch_size
            continue
        if _shapes(model.state_dict()) == _shapes(state):
            return extra
    raise ValueError(f"model '{arch}' does not fit timm's '{arch}' for {spec}")


def save_models(
    models: Models,
    model_spec: ModelSpec,
    out_dir: str | Path,
    *,
    architectures: Mapping[str, str] | None = None,
    metadata: Mapping | None = None,
) -> Path:
    """Save every model as `<name>.safetensors` plus a `models.json` that rebuilds them.

    Parameters
    ----------
    models : ArrayRecord | Mapping[str, dict[str, np.ndarray]]
        The global `ArrayRecord` of a flwr-kd strategy (`Result.arrays` of `FedDF` or
        `HeteroFedAvg`: one model per architecture, keyed `"<arch>/<parameter>"`), or state
        dicts by model name.
    model_spec : ModelSpec
        Classes, channels and image size the models were built for (`create_model`).
    out_dir : str | Path
        Directory to write into, created if needed; files of the same names are replaced.
    architectures : Mapping[str, str] | None (default: None)
        The timm architecture of each model name, for models not named after their
        architecture (FedMD's client models: `{"client-0": "resnet10t", ...}`). Names not
        listed are their own architecture.
    metadata : Mapping | None (default: None)
        JSON values stored under `"metadata"` in `models.json` (e.g. the input
        normalisation and the accuracy each model reached).

    Returns
    -------
    Path
        The path of `models.json`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, state in as_state_dicts(models).items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"model name '{name}' is not usable as a file name")
        arch = (architectures or {}).get(name, name)
        entries[name] = {
            "file": f"{name}.safetensors",
            "architecture": arch,
            "num_classes": model_spec.num_classes,
            "in_chans": model_spec.in_chans,
            "img_size": model_spec.img_size,
            "timm_kwargs": _timm_kwargs(arch, model_spec, state),
        }
        tensors = {key: np.require(value, requirements="C") for key, value in state.items()}
        save_file(tensors, str(out / entries[name]["file"]), metadata={"format": "pt"})
    manifest = {"format": FORMAT, "models": entries, "metadata": dict(metadata or {})}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{MANIFEST}.")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, out / MANIFEST)
    return out / MANIFEST


def load_manifest(directory: str | Path) -> dict:
    """The `models.json` that `save_models` wrote in `directory`."""
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}/{MANIFEST} is not a {FORMAT} manifest")
    return manifest


def load_models(directory: str | Path) -> dict[str, torch.nn.Module]:
    """Rebuild every model that `save_models` wrote, with timm alone, in eval mode.

    Parameters
    ----------
    directory : str | Path
        The `out_dir` given to `save_models`.

    Returns
    -------
    dict[str, torch.nn.Module]
        The models by name, in the order they were saved.
    """
    models = {}
    for name, entry in load_manifest(directory)["models"].items():
        model = timm.create_model(
            entry["architecture"],
            num_classes=entry["num_classes"],
            in_chans=entry["in_chans"],
            **entry["timm_kwargs"],
        )
        model.load_state_dict(load_file(str(Path(directory) / entry["file"])))
        models[name] = model.eval()
    return models
