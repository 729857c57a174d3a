"""Finding a deployment with the Cloud Functions API (`google-cloud-functions`), and checking
before round 1 that every function is ACTIVE.

Functions are recognised by the names terraform/ gives them (`<prefix>-client-<id>`,
`<prefix>-agg-<arch>`) and described by the environment they run with (docs/serverless.md).
"""

from __future__ import annotations

from flwr_kd.serverless.grid import ClientEndpoint


class DeploymentError(RuntimeError):
    """The deployment is incomplete or not ready; the message says which function and why."""


def _client(client):
    if client is not None:
        return client
    from google.cloud import functions_v2

    return functions_v2.FunctionServiceClient()


def _functions(project: str, region: str, client) -> list:
    return list(_client(client).list_functions(parent=f"projects/{project}/locations/{region}"))


def _short(fn) -> str:
    return fn.name.rsplit("/", 1)[-1]


def _state(fn) -> str:
    state = fn.state
    return getattr(state, "name", str(state))


def discover(project: str, region: str, prefix: str, client=None):
    """A `Deployment` from the functions named `<prefix>-client-*` and `<prefix>-agg-*`."""
    from flwr_kd.serverless.driver import Deployment

    clients, aggregators, buckets = [], {}, set()
    for fn in _functions(project, region, client):
        name, env = _short(fn), dict(fn.service_config.environment_variables)
        if name.startswith(f"{prefix}-client-"):
            clients.append(
                ClientEndpoint(env["FLWR_KD_CLIENT_ID"], fn.service_config.uri, env["FLWR_KD_ARCH"])
            )
        elif name.startswith(f"{prefix}-agg-"):
            aggregators[env["FLWR_KD_ARCH"]] = fn.service_config.uri
        else:
            continue
        buckets.add(env.get("FLWR_KD_BUCKET"))
    if not clients or not aggregators:
        raise DeploymentError(
            f"no '{prefix}-client-*' or '{prefix}-agg-*' functions in projects/{project}/locations/{region}; "
            "check --project, --region and --name-prefix, or run terraform apply"
        )
    if len(buckets) != 1:
        raise DeploymentError(
            f"the functions disagree on FLWR_KD_BUCKET: {sorted(map(str, buckets))}"
        )
    missing = sorted({c.arch for c in clients} - set(aggregators))
    if missing:
        raise DeploymentError(f"no aggregator function for architecture(s) {missing}")
    return Deployment(
        bucket=buckets.pop(),
        clients=sorted(clients, key=lambda c: c.client_id),
        aggregators=aggregators,
    )


def check_active(project: str, region: str, urls: list[str], client=None) -> None:
    """Raise `DeploymentError` naming every function at `urls` that is missing or not ACTIVE."""
    by_url = {fn.service_config.uri: fn for fn in _functions(project, region, client)}
    problems = []
    for url in urls:
        fn = by_url.get(url)
        if fn is None:
            problems.append(f"{url}: no such function in projects/{project}/locations/{region}")
        elif _state(fn) != "ACTIVE":
            problems.append(f"{_short(fn)}: state {_state(fn)}, not ACTIVE")
    if problems:
        raise DeploymentError("functions not ready: " + "; ".join(problems))
