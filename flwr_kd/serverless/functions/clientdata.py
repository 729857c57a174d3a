"""A client function's data, read from Cloud Storage once per split and instance: its private
partition under its own root, the public and test sets; and the check that the arrays a
message carries fit this client's model and inputs (a 400 before anything runs)."""

from __future__ import annotations

import functools

from flwr.app import ConfigRecord, Context, Message

from flwr_kd import protocol
from flwr_kd.client import ClientData
from flwr_kd.models import ModelSpec, create_model, state_to_numpy
from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import ArrayStoreError
from flwr_kd.serverless.functions.env import FunctionEnv, array_store


@functools.lru_cache(maxsize=2)
def client_data(bucket: str, data_prefix: str, fingerprint: str) -> ClientData:
    store = array_store(bucket)
    private = store.get(names.private_object(data_prefix, fingerprint))
    public_name, test_name = names.public_objects(fingerprint)
    public = store.get(public_name)
    test = store.get(test_name) if store.exists(test_name) else {}
    spec = ModelSpec(
        int(private["num_classes"]),
        int(private["train_x"].shape[1]),
        int(private["train_x"].shape[2]),
    )
    return ClientData(
        private["train_x"],
        private["train_y"],
        private["holdout_x"],
        private["holdout_y"],
        spec,
        public_x=public["x"],
        test_x=test.get("x"),
        test_y=test.get("y"),
    )


def load_function_data(context: Context, config: ConfigRecord) -> ClientData:
    """`KDClient.load_data` inside the client function: its own root, nothing else."""
    env = FunctionEnv.from_environ("client")
    client = env.serving(context.node_config["client-id"] if env.pool else None)
    return client_data(env.bucket, client.data_prefix, names.data_fingerprint(config))


@functools.lru_cache(maxsize=4)
def _model_shapes(arch: str, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_to_numpy(create_model(arch, spec)).items()}


def payload_problem(
    msg: Message, env: FunctionEnv, data_prefix: str, config: ConfigRecord
) -> str | None:
    """Why the arrays a message carries cannot be this client's model or public inputs (a 400
    before anything runs or is written), or None."""
    if not msg.has_content() or not (
        protocol.ARRAYS in msg.content or protocol.PUBLIC in msg.content
    ):
        return None
    try:
        spec = client_data(env.bucket, data_prefix, names.data_fingerprint(config)).model_spec
    except ArrayStoreError:
        return None  # no data for this split: the handler answers with an error reply, as before
    if protocol.ARRAYS in msg.content:
        expected = _model_shapes(env.arch, spec)
        got = {k: tuple(v.shape) for k, v in msg.content[protocol.ARRAYS].items()}
        if got.keys() != expected.keys():
            return f"weights do not fit '{env.arch}': {len(got)} arrays, expected {len(expected)}"
        wrong = next((k for k in expected if got[k] != expected[k]), None)
        if wrong:
            return (
                f"weights do not fit '{env.arch}': '{wrong}' has shape {got[wrong]}, "
                f"expected {expected[wrong]}"
            )
    public = msg.content.get(protocol.PUBLIC)
    if public is not None and "x" in public:  # FedDF's inputs (FedMD's: indices)
        shape = tuple(public["x"].shape)
        want = (spec.in_chans, spec.img_size, spec.img_size)
        if len(shape) != 4 or shape[1:] != want:
            return f"public inputs must have shape (n, {', '.join(map(str, want))}), got {shape}"
    return None
