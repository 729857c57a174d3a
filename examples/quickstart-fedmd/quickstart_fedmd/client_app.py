"""quickstart-fedmd: a Flower ClientApp whose model never leaves the node.

`KDClient` registers flwr-kd's handlers on this app's own data loader; FedMD uses
`train.fedmd` (fine-tune the transfer-learned weights once, then each round: digest the
server's consensus on public inputs, revisit the private data, reply logits on the next public
subset) and `query.architecture`. Between rounds the node keeps its model in the store the
server names (`state-uri`); only logits travel. The architecture comes from the node config
(`arch`) or from the run config's `archs` list, by partition id.
"""

from flwr.clientapp import ClientApp

from flwr_kd.client import KDClient
from quickstart_fedmd.task import load_client_data

# load_data must be a module-level function: Flower pickles the ClientApp in simulation.
app = KDClient(load_data=load_client_data).register(ClientApp())
