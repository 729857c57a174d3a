"""flwr-kd: federated learning across heterogeneous timm models by knowledge distillation."""

from flwr_kd.strategy import FedDF, FedMD, HeteroFedAvg

__all__ = ["FedDF", "FedMD", "HeteroFedAvg"]
__version__ = "0.1.0"
