"""flwr-kd strategies (Flower Message API), one module each as in `flwr.serverapp.strategy`:
`fedavg` (FedAvg per architecture group), `feddf`, `fedmd`; `base` holds their shared run
contract (`prepare`, `start`, `close`), `replies` the screening of client replies."""

from flwr_kd.strategy.fedavg import HeteroFedAvg
from flwr_kd.strategy.feddf import FedDF
from flwr_kd.strategy.fedmd import FedMD, FedMDError
from flwr_kd.strategy.replies import TooFewReplies

__all__ = ["FedDF", "FedMD", "FedMDError", "HeteroFedAvg", "TooFewReplies"]
