"""flwr-kd strategies (Flower Message API)."""

from flwr_kd.strategy.feddf import FedDF
from flwr_kd.strategy.fedmd import FedMD, FedMDError
from flwr_kd.strategy.hetero import HeteroFedAvg, TooFewReplies

__all__ = ["FedDF", "FedMD", "FedMDError", "HeteroFedAvg", "TooFewReplies"]
