"""timm models as classifiers for any dataset shape.

Every client names its architecture with a plain timm model name. `create_model` turns that
name into a randomly initialised classifier for the dataset's classes, channels and image size,
adapting the few families that bake the input size into their weights (ViTs get `img_size` and
a patch size that yields a 4x4 token grid).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import timm
import torch

#: Small architectures from three families that train fast on a CPU at 16x16 and 28x28
#: grayscale (see DESIGN.md's CPU budget): a ResNet, a MobileNetV3 and a ViT.
DEFAULT_ARCHITECTURES: tuple[str, ...] = ("resnet10t", "mobilenetv3_small_050", "test_vit")

#: Families whose convolutional stems outgrow feature maps below 32 px.
_MIN_IMAGE_SIZE = {"convnext": 32}


class UnknownArchitectureError(ValueError):
    """The architecture is not a timm model name, or cannot take the dataset's images."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model must fit: the dataset's classes, channels and (square) image size."""

    num_classes: int
    in_chans: int
    img_size: int


def check_architecture(name: str, spec: ModelSpec | None = None) -> None:
    """Raise `UnknownArchitectureError` naming the problem if `name` cannot be built."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UnknownArchitectureError(f"unknown architecture '{name}': not a timm model{hint}")
    if spec is not None:
        for family, min_size in _MIN_IMAGE_SIZE.items():
            if name.startswith(family) and spec.img_size < min_size:
                raise UnknownArchitectureError(
                    f"architecture '{name}' needs images of at least {min_size}px, "
                    f"the dataset has {spec.img_size}px"
                )


def vit_kwargs(spec: ModelSpec) -> dict[str, int]:
    """What ViT-style nets get besides classes and channels (`flwr_kd.export` records them):
    position embeddings sized from img_size, and a 4x4 token grid, fast on small images."""
    return {"img_size": spec.img_size, "patch_size": max(1, spec.img_size // 4)}


def create_model(name: str, spec: ModelSpec) -> torch.nn.Module:
    """Build timm model `name` (random init) as a classifier fitting `spec`."""
    check_architecture(name, spec)
    common = {"pretrained": False, "num_classes": spec.num_classes, "in_chans": spec.in_chans}
    try:
        return timm.create_model(name, **vit_kwargs(spec), **common)
    except TypeError:
        # Convolutional nets take any input size and reject those keyword arguments.
        return timm.create_model(name, **common)


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (float tensors and BN counters alike)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load numpy arrays into `model`, casting to each parameter's dtype."""
    current = model.state_dict()
    model.load_state_dict(
        {k: torch.as_tensor(state[k]).to(current[k].dtype) for k in current}, strict=True
    )
