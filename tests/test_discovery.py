"""Finding a deployment and checking it is ACTIVE, against a stand-in for the Cloud Functions
API (no emulator of that API exists): the stand-in returns objects shaped like
`google.cloud.functions_v2.Function`, built from the real protobuf types."""

from __future__ import annotations

import pytest
from google.api_core.exceptions import PermissionDenied
from google.cloud import functions_v2, run_v2

from flwr_kd.serverless.deployment import Deployment, DeploymentError, check_active, discover

PROJECT, REGION = "demo-p", "europe-west1"


def function(name: str, state: str, env: dict) -> functions_v2.Function:
    return functions_v2.Function(
        name=f"projects/{PROJECT}/locations/{REGION}/functions/{name}",
        state=functions_v2.Function.State[state],
        service_config=functions_v2.ServiceConfig(
            uri=f"https://{name}.run.app", environment_variables=env
        ),
    )


class FunctionsApi:
    """Answers list_functions like FunctionServiceClient, for one project and region."""

    def __init__(self, functions):
        self.functions, self.parents = functions, []

    def list_functions(self, parent: str):
        self.parents.append(parent)
        return iter(self.functions)


def deployed(states=("ACTIVE", "ACTIVE", "ACTIVE")):
    env = {"FLWR_KD_BUCKET": "arrays"}
    return FunctionsApi(
        [
            function(
                "kd-client-c0",
                states[0],
                {**env, "FLWR_KD_CLIENT_ID": "c0", "FLWR_KD_ARCH": "resnet10t"},
            ),
            function(
                "kd-client-c1",
                states[1],
                {**env, "FLWR_KD_CLIENT_ID": "c1", "FLWR_KD_ARCH": "test_vit"},
            ),
            function("kd-agg-resnet10t", states[2], {**env, "FLWR_KD_ARCH": "resnet10t"}),
            function("kd-agg-test-vit", "ACTIVE", {**env, "FLWR_KD_ARCH": "test_vit"}),
            function("other-service", "FAILED", {}),
        ]
    )


def test_discover_builds_the_deployment_from_names_and_environment():
    api = deployed()
    dep = discover(PROJECT, REGION, "kd", client=api)
    assert api.parents == [f"projects/{PROJECT}/locations/{REGION}"]
    assert dep.bucket == "arrays"
    assert [(c.client_id, c.arch, c.url) for c in dep.clients] == [
        ("c0", "resnet10t", "https://kd-client-c0.run.app"),
        ("c1", "test_vit", "https://kd-client-c1.run.app"),
    ]
    assert dep.aggregators == {
        "resnet10t": "https://kd-agg-resnet10t.run.app",
        "test_vit": "https://kd-agg-test-vit.run.app",
    }


def test_discover_with_a_wrong_prefix_says_what_to_check():
    with pytest.raises(DeploymentError, match="no 'nope-client-\\*'.*--name-prefix"):
        discover(PROJECT, REGION, "nope", client=deployed())


def test_check_active_names_every_function_not_ready():
    api = deployed(states=("ACTIVE", "DEPLOYING", "FAILED"))
    dep = discover(PROJECT, REGION, "kd", client=api)
    urls = [c.url for c in dep.clients] + list(dep.aggregators.values()) + ["https://gone.run.app"]
    with pytest.raises(DeploymentError) as err:
        check_active(PROJECT, REGION, urls, client=api)
    message = str(err.value)
    assert (
        "kd-client-c1: state DEPLOYING" in message and "kd-agg-resnet10t: state FAILED" in message
    )
    assert "https://gone.run.app: no such function" in message and "kd-client-c0" not in message


def test_check_active_passes_when_all_are_active():
    api = deployed()
    dep = discover(PROJECT, REGION, "kd", client=api)
    check_active(
        PROJECT, REGION, [c.url for c in dep.clients] + list(dep.aggregators.values()), client=api
    )


def test_discover_takes_the_database_and_data_prefixes_from_the_functions():
    api = deployed()
    for fn in api.functions[:4]:
        fn.service_config.environment_variables["FLWR_KD_FIRESTORE_DATABASE"] = "kd-runs"
    api.functions[0].service_config.environment_variables["FLWR_KD_DATA_PREFIX"] = (
        "clients/c0/data/custom/"
    )
    dep = discover(PROJECT, REGION, "kd", client=api)
    assert dep.firestore_database == "kd-runs"
    assert [(c.root, c.data_prefix) for c in dep.clients] == [
        ("clients/c0/", "clients/c0/data/custom/"),
        ("clients/c1/", "clients/c1/data/"),
    ]


def test_terraform_outputs_give_roots_data_prefixes_and_the_database():
    outputs = {
        "client_function_urls": {"value": {"c0": "https://pool", "c1": "https://pool"}},
        "client_architectures": {"value": {"c0": "resnet10t", "c1": "resnet10t"}},
        "client_roots": {"value": {"c0": "pools/resnet10t/clients/c0/", "c1": "clients/c1/"}},
        "client_data_prefixes": {"value": {"c1": "clients/c1/data/elsewhere/"}},
        "aggregator_function_urls": {"value": {"resnet10t": "https://agg"}},
        "arrays_bucket": {"value": "arrays"},
        "firestore_database": {"value": "kd-runs"},
    }
    dep = Deployment.from_terraform_outputs(outputs)
    assert dep.firestore_database == "kd-runs"
    assert [(c.client_id, c.root, c.data_prefix) for c in dep.clients] == [
        ("c0", "pools/resnet10t/clients/c0/", "pools/resnet10t/clients/c0/data/"),
        ("c1", "clients/c1/", "clients/c1/data/elsewhere/"),
    ]
    outputs["client_data_prefixes"]["value"]["c1"] = "clients/c0/data/"  # another client's
    with pytest.raises(ValueError, match="outside its root clients/c1/"):
        Deployment.from_terraform_outputs(outputs)


def test_terraform_outputs_list_clients_in_partition_order():
    """Client i holds partition i (Terraform numbers them so): client-10 comes after client-9,
    not after client-1 as a string sort would put it."""
    ids = [f"client-{i}" for i in range(12)]
    outputs = {
        "client_function_urls": {"value": {c: f"https://{c}" for c in ids}},
        "client_architectures": {"value": dict.fromkeys(ids, "resnet10t")},
        "aggregator_function_urls": {"value": {"resnet10t": "https://agg"}},
        "arrays_bucket": {"value": "arrays"},
    }
    assert [c.client_id for c in Deployment.from_terraform_outputs(outputs).clients] == ids


class ForbiddenApi:
    """The Cloud Functions API as a driver without roles/cloudfunctions.viewer sees it."""

    def list_functions(self, parent: str):
        raise PermissionDenied("Permission 'cloudfunctions.functions.list' denied")


def test_check_active_without_the_permission_warns_and_names_it(capsys):
    check_active(PROJECT, REGION, ["https://kd-client-c0.run.app"], client=ForbiddenApi())
    err = capsys.readouterr().err
    assert "warning" in err and "cloudfunctions.functions.list" in err, err


class CloudRunApi:
    """Answers list_services like run_v2.ServicesClient: the pooled mode's services."""

    def __init__(self, services):
        self.services = services

    def list_services(self, parent: str):
        assert parent == f"projects/{PROJECT}/locations/{REGION}"
        return iter(self.services)


def service(name: str, state: str) -> run_v2.Service:
    return run_v2.Service(
        name=f"projects/{PROJECT}/locations/{REGION}/services/{name}",
        uri=f"https://{name}-abc.a.run.app",
        urls=[f"https://{name}-123.{REGION}.run.app"],
        terminal_condition=run_v2.Condition(state=run_v2.Condition.State[state]),
    )


def test_pooled_deployments_are_checked_as_cloud_run_services():
    """Terraform's pooled mode deploys Cloud Run services, not Cloud Functions: the check asks
    the Cloud Run API and reads each service's terminal condition."""
    api = CloudRunApi(
        [service("kd-pool-resnet10t", "CONDITION_SUCCEEDED"), service("kd-agg", "CONDITION_FAILED")]
    )
    ready = [f"https://kd-pool-resnet10t-123.{REGION}.run.app"]
    check_active(PROJECT, REGION, ready, client=api, mode="pooled")
    with pytest.raises(DeploymentError, match="kd-agg: state CONDITION_FAILED, not ready"):
        check_active(
            PROJECT, REGION, [*ready, "https://kd-agg-abc.a.run.app"], client=api, mode="pooled"
        )
    outputs = {
        "deployment_mode": {"value": "pooled"},
        "client_function_urls": {"value": {"c0": ready[0]}},
        "client_architectures": {"value": {"c0": "resnet10t"}},
        "aggregator_function_urls": {"value": {"resnet10t": "https://kd-agg-abc.a.run.app"}},
        "arrays_bucket": {"value": "arrays"},
    }
    assert Deployment.from_terraform_outputs(outputs).mode == "pooled"


class ForbiddenRunApi:
    def list_services(self, parent: str):
        raise PermissionDenied("Permission 'run.services.list' denied")


def test_pooled_check_without_the_permission_warns_and_names_it(capsys):
    check_active(PROJECT, REGION, ["https://x.run.app"], client=ForbiddenRunApi(), mode="pooled")
    err = capsys.readouterr().err
    assert "run.services.list" in err and "roles/run.viewer" in err and "warning" in err
