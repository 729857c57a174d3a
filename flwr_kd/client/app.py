"""A ready `ClientApp` on flwr-kd's own data split (`flwr run` and `flwr-kd simulate` use it)."""

from flwr.clientapp import ClientApp

from flwr_kd.client.handlers import KDClient
from flwr_kd.faults import fault_injection_mod

#: Injects the faults the run config asks for (`fail-rate`); a no-op by default.
app = KDClient().register(ClientApp(mods=[fault_injection_mod]))
