"""Cloud Functions (gen2) entry points of flwr-kd: `client` and `aggregator`.

Deployed by terraform/ with `flwr_kd/` beside this file; run locally with
`functions-framework --source cloud/main.py --target client` (see `flwr-kd cloud emulate`).
"""

import functions_framework

from flwr_kd.serverless.functions.aggregator import handle_aggregator
from flwr_kd.serverless.functions.client import handle_client
from flwr_kd.serverless.functions.http import as_response


@functions_framework.http
def client(request):
    """One Flower message to this client (train, evaluate, query.architecture, train.fedmd)."""
    return as_response(handle_client, request)


@functions_framework.http
def aggregator(request):
    """One fan-out task (distillation or transfer learning) for this function's architecture."""
    return as_response(handle_aggregator, request)
