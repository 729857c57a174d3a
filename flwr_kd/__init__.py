"""flwr-kd: federated learning across heterogeneous timm models by knowledge distillation."""

from flwr_kd.evaluation import make_evaluate_fn
from flwr_kd.export import load_models, save_models
from flwr_kd.strategy import FedDF, FedMD, HeteroFedAvg

__all__ = ["FedDF", "FedMD", "HeteroFedAvg", "load_models", "make_evaluate_fn", "save_models"]
__version__ = "0.1.0"
