"""A ready `ClientApp` on flwr-kd's own data split (`flwr run` and `flwr-kd simulate` use it)."""

from flwr.clientapp import ClientApp

from flwr_kd.client.handlers import KDClient

app = KDClient().register(ClientApp())
