"""Where a deployment's functions and bucket are: from `terraform output -json`, or found with
the Cloud Functions API (`google-cloud-functions`); and the check before round 1 that every
function is ACTIVE.

Functions are recognised by the names terraform/ gives them (`<prefix>-client-<id>`,
`<prefix>-agg-<arch>`) and described by the environment they run with (docs/serverless.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr_kd.serverless.grid import ClientEndpoint


class DeploymentError(RuntimeError):
    """The deployment is incomplete or not ready; the message says which function and why."""


@dataclass
class Deployment:
    """Where the functions and buckets of one deployment are."""

    bucket: str
    clients: list[ClientEndpoint]
    aggregators: dict[str, str]  # architecture -> URL
    firestore_database: str = "(default)"

    @classmethod
    def from_terraform_outputs(cls, outputs: dict) -> Deployment:
        """From `terraform output -json` (values under "value", as Terraform writes them)."""

        def value(name):
            if name not in outputs:
                raise ValueError(
                    f"terraform outputs lack '{name}'; run terraform apply in terraform/ first"
                )
            entry = outputs[name]
            return entry["value"] if isinstance(entry, dict) and "value" in entry else entry

        urls, archs = value("client_function_urls"), value("client_architectures")
        return cls(
            bucket=value("arrays_bucket"),
            clients=[ClientEndpoint(cid, urls[cid], archs[cid]) for cid in sorted(urls)],
            aggregators=dict(value("aggregator_function_urls")),
            firestore_database=outputs.get("firestore_database", {}).get("value", "(default)")
            if isinstance(outputs.get("firestore_database"), dict)
            else "(default)",
        )

    def function_urls(self) -> list[str]:
        """Every client and aggregator function of the deployment."""
        return [c.url for c in self.clients] + list(self.aggregators.values())


def _client(client):
    if client is not None:
        return client
    from google.cloud import functions_v2  # only `cloud run` without --outputs needs it

    return functions_v2.FunctionServiceClient()


def _functions(project: str, region: str, client) -> list:
    return list(_client(client).list_functions(parent=f"projects/{project}/locations/{region}"))


def _short(fn) -> str:
    return fn.name.rsplit("/", 1)[-1]


def _state(fn) -> str:
    state = fn.state
    return getattr(state, "name", str(state))


def discover(project: str, region: str, prefix: str, client=None) -> Deployment:
    """A `Deployment` from the functions named `<prefix>-client-*` and `<prefix>-agg-*`."""
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
            f"no '{prefix}-client-*' or '{prefix}-agg-*' functions in "
            f"projects/{project}/locations/{region}; "
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
