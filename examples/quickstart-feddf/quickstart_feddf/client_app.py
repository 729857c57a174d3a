"""quickstart-feddf: a Flower ClientApp that trains this node's timm architecture.

Flower's quickstart writes `@app.train()` and `@app.evaluate()` itself for one shared model.
Here `KDClient` registers flwr-kd's handlers instead (train: local training plus logits on the
round's public inputs; evaluate; `query.architecture`, which tells the server this node's
architecture), on this app's own data loader. The architecture comes from the node config
(`arch`) or from the run config's `archs` list, by partition id.
"""

from flwr.clientapp import ClientApp

from flwr_kd.client import KDClient
from quickstart_feddf.task import load_client_data

# load_data must be a module-level function: Flower pickles the ClientApp in simulation.
app = KDClient(load_data=load_client_data).register(ClientApp())
