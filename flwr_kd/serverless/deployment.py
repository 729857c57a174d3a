"""Where a deployment's functions, bucket, client roots and Firestore database are: from
`terraform output -json`, or found with the Cloud Functions API (`google-cloud-functions`);
and the check before round 1 that every function is ready: ACTIVE Cloud Functions in the
isolated mode, Cloud Run services whose terminal condition succeeded in the pooled mode
(`google-cloud-run`), as Terraform deploys them.

Functions are recognised by the names terraform/ gives them (`<prefix>-client-<id>`,
`<prefix>-agg-<arch>`) and described by the environment they run with (docs/serverless.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from google.api_core import exceptions as gexc

from flwr_kd.serverless import names
from flwr_kd.serverless.grid import ClientEndpoint

#: The permission `check_active` needs, and the role Terraform grants it in, per mode.
LIST_PERMISSION = "cloudfunctions.functions.list"
LIST_PERMISSIONS = {
    "isolated": (LIST_PERMISSION, "roles/cloudfunctions.viewer"),
    "pooled": ("run.services.list", "roles/run.viewer"),
}


class DeploymentError(RuntimeError):
    """The deployment is incomplete or not ready; the message says which function and why."""


@dataclass
class Deployment:
    """Where the functions and buckets of one deployment are."""

    bucket: str
    clients: list[ClientEndpoint]
    aggregators: dict[str, str]  # architecture -> URL
    firestore_database: str = "(default)"
    #: "isolated" (Cloud Functions) or "pooled" (Cloud Run services), as terraform/ deployed it.
    mode: str = "isolated"

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

        def optional(name, default):
            return value(name) if name in outputs else default

        urls, archs = value("client_function_urls"), value("client_architectures")
        roots, prefixes = optional("client_roots", {}), optional("client_data_prefixes", {})
        return cls(
            bucket=value("arrays_bucket"),
            clients=[
                ClientEndpoint(
                    cid, urls[cid], archs[cid], roots.get(cid, ""), prefixes.get(cid, "")
                )
                for cid in sorted(urls, key=names.client_order)
            ],
            aggregators=dict(value("aggregator_function_urls")),
            firestore_database=optional("firestore_database", "(default)"),
            mode=optional("deployment_mode", "isolated"),
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


def _state(item) -> str:
    """A Cloud Function's state, or a Cloud Run service's terminal condition's."""
    state = item.state if hasattr(item, "service_config") else item.terminal_condition.state
    return getattr(state, "name", str(state))


def discover(project: str, region: str, prefix: str, client=None) -> Deployment:
    """A `Deployment` from the functions named `<prefix>-client-*` and `<prefix>-agg-*`."""
    clients, aggregators, buckets, databases = [], {}, set(), set()
    for fn in _functions(project, region, client):
        name, env = _short(fn), dict(fn.service_config.environment_variables)
        if name.startswith(f"{prefix}-client-"):
            cid = env["FLWR_KD_CLIENT_ID"]
            data_prefix = env.get("FLWR_KD_DATA_PREFIX", "")
            clients.append(
                ClientEndpoint(cid, fn.service_config.uri, env["FLWR_KD_ARCH"], "", data_prefix)
            )
        elif name.startswith(f"{prefix}-agg-"):
            aggregators[env["FLWR_KD_ARCH"]] = fn.service_config.uri
        else:
            continue
        buckets.add(env.get("FLWR_KD_BUCKET"))
        databases.add(env.get("FLWR_KD_FIRESTORE_DATABASE") or "(default)")
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
    if len(databases) != 1:
        raise DeploymentError(
            f"the functions disagree on FLWR_KD_FIRESTORE_DATABASE: {sorted(databases)}"
        )
    missing = sorted({c.arch for c in clients} - set(aggregators))
    if missing:
        raise DeploymentError(f"no aggregator function for architecture(s) {missing}")
    return Deployment(
        bucket=buckets.pop(),
        clients=sorted(clients, key=lambda c: names.client_order(c.client_id)),
        aggregators=aggregators,
        firestore_database=databases.pop(),
    )


def check_active(
    project: str, region: str, urls: list[str], client=None, mode: str = "isolated"
) -> None:
    """Raise `DeploymentError` naming every function at `urls` that is missing or not ready.
    A driver not allowed to list them is warned (naming the permission), not stopped: the
    first call to a function that is not ready fails, and is retried, anyway."""
    permission, role = LIST_PERMISSIONS[mode]
    try:
        listed = (_services if mode == "pooled" else _functions)(project, region, client)
    except gexc.PermissionDenied as exc:
        print(
            f"flwr-kd: warning: cannot check that the functions are ready: the driver lacks "
            f"{permission} on projects/{project}/locations/{region} "
            f"({role}); going on without the check ({exc.message})",
            file=sys.stderr,
        )
        return
    by_url = {url: item for item in listed for url in _urls(item)}
    problems = []
    for url in urls:
        item = by_url.get(url)
        if item is None:
            problems.append(f"{url}: no such function in projects/{project}/locations/{region}")
        elif _state(item) not in READY_STATES:
            problems.append(f"{_short(item)}: state {_state(item)}, not ready")
    if problems:
        raise DeploymentError("functions not ready: " + "; ".join(problems))


#: A Cloud Function's `state`, or a Cloud Run service's terminal condition, when it serves.
READY_STATES = ("ACTIVE", "CONDITION_SUCCEEDED")


def _services(project: str, region: str, client) -> list:
    """The region's Cloud Run services (the pooled mode's functions)."""
    if client is None:
        from google.cloud import run_v2

        client = run_v2.ServicesClient()
    return list(client.list_services(parent=f"projects/{project}/locations/{region}"))


def _urls(item) -> list[str]:
    """A Cloud Function's URL, or a Cloud Run service's URLs (`uri` and its other forms)."""
    if hasattr(item, "service_config"):
        return [item.service_config.uri]
    return [item.uri, *item.urls]
