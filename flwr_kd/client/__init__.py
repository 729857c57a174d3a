"""Client side of flwr-kd: message handlers that any Flower `ClientApp` can register."""

from flwr_kd.client.handlers import KDClient
from flwr_kd.client.node import ClientData, resolve_architecture

__all__ = ["ClientData", "KDClient", "resolve_architecture"]
