"""ClientApp: flwr-kd's handlers on this node's partition; its architecture comes from the
node config (`arch`) or from the run config's `archs` list, by partition id."""

from flwr.clientapp import ClientApp

from flwr_kd.client import KDClient

app = KDClient().register(ClientApp())
