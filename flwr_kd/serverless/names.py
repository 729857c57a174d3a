"""Every Cloud Storage object name and Firestore document path of the serverless runtime.

This module is the code half of the contract in docs/serverless.md (terraform/'s IAM conditions
match the same prefixes). The driver, the functions, the audit and the benchmarks ask here and
build no name themselves, so a change of layout is one edit in this file. Both sides of the
wire import it; it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import zlib

from flwr_kd.data import DataSpec

#: Aggregator calls are named `aggregator:<arch>:<task>`; client calls `<client-id>:<type>`.
AGGREGATOR_CALL = "aggregator"

# ---------------------------------------------------------------------- identities


def node_id_for(client_id: str) -> int:
    """A stable Flower node id (a positive int) for a client id."""
    return zlib.crc32(client_id.encode()) + 1


def data_fingerprint(config) -> str:
    """Names the data split a message's config describes, so a new split never reads old data."""
    spec = DataSpec.from_config(dict(config))
    return hashlib.sha256(json.dumps(spec.to_config(), sort_keys=True).encode()).hexdigest()[:16]


def message_id(run: str, server_round: int, client_id: str, message_type: str) -> str:
    """The Flower message id the driver gives a message: deterministic, so a retried or resumed
    call is recognised; it also names the message's objects (`message_prefix`)."""
    return f"{run}.r{server_round}.{client_id}.{message_type}"


def client_call(client_id: str, message_type: str) -> str:
    """The invocation id of one message type sent to one client (one per round)."""
    return f"{client_id}:{message_type}"


def aggregator_call(arch: str, task_object: str) -> str:
    """The invocation id of one aggregator task, named after its task object."""
    task = task_object.rsplit("/", 1)[-1].removesuffix(".npz")
    return f"{AGGREGATOR_CALL}:{arch}:{task}"


def is_aggregator_call(call: str) -> bool:
    return call.startswith(f"{AGGREGATOR_CALL}:")


def split_client_call(call: str) -> tuple[str, str]:
    """(client id, message type) of a client invocation id."""
    client_id, message_type = call.split(":", 1)
    return client_id, message_type


# ---------------------------------------------------------------------- data and client state


def public_objects(fingerprint: str) -> tuple[str, str]:
    """(public data, test data) object names of one split."""
    return f"public/{fingerprint}/data.npz", f"public/{fingerprint}/test.npz"


def client_data_prefix(client_id: str) -> str:
    """Where a client's private partitions lie (`FLWR_KD_DATA_PREFIX` of its function)."""
    return f"clients/{client_id}/data/"


def private_object(data_prefix: str, fingerprint: str) -> str:
    """A client's private partition of one split, under its data prefix."""
    return f"{data_prefix.rstrip('/')}/{fingerprint}/private.npz"


def client_state_uri(bucket: str, client_id: str) -> str:
    """The `state-uri` a client function uses: its own prefix, whatever the driver sent."""
    return f"gs://{bucket}/clients/{client_id}/state"


def driver_state_uri(bucket: str) -> str:
    """The `state-uri` the driver sends: only its scheme matters, as each client function
    replaces it with `client_state_uri`."""
    return f"gs://{bucket}/clients/state"


def state_object(prefix: str, key: str) -> str:
    """One key's state (e.g. `node-<id>`) under a state prefix."""
    return f"{prefix.rstrip('/')}/{key}.npz"


# ---------------------------------------------------------------------- one run's objects


def run_prefix(run: str) -> str:
    return f"runs/{run}/"


def round_prefix(run: str, server_round: int | str) -> str:
    return f"{run_prefix(run)}rounds/{server_round}/"


def client_messages_prefix(run: str, server_round: int | str, client_id: str) -> str:
    """Message arrays the driver wrote for one client in one round; the client reads only these."""
    return f"{round_prefix(run, server_round)}messages/{client_id}/"


def message_prefix(run: str, server_round: int, client_id: str, message_id: str) -> str:
    """The prefix of one message's offloaded records (see `record_object`)."""
    return client_messages_prefix(run, server_round, client_id) + message_id


def client_replies_prefix(run: str, server_round: int | str, client_id: str) -> str:
    """Everything one client's replies stored in one round."""
    return f"{round_prefix(run, server_round)}clients/{client_id}/"


def reply_prefix(run: str, server_round: int, client_id: str, message_type: str) -> str:
    """The prefix of one reply's stored records (`logits.npz`, `arrays.npz`)."""
    return client_replies_prefix(run, server_round, client_id) + message_type.replace(".", "-")


def record_object(prefix: str, record: str) -> str:
    """One offloaded array record of a message or reply."""
    return f"{prefix}/{record}.npz"


def aggregator_prefix(run: str, server_round: int, arch: str) -> str:
    """Task inputs (driver) and results (the aggregator of `arch`) of one round."""
    return f"{round_prefix(run, server_round)}aggregators/{arch}/"


def aggregator_task_object(run: str, server_round: int, arch: str, kind: str, index: int) -> str:
    return aggregator_prefix(run, server_round, arch) + f"task-{kind}-{index}.npz"


def aggregator_result_object(run: str, server_round: int, arch: str, kind: str) -> str:
    """A distilled student (`kind` "distill") or transfer-learned weights ("train")."""
    name = "student.npz" if kind == "distill" else "pretrained.npz"
    return aggregator_prefix(run, server_round, arch) + name


def global_object(run: str, server_round: int) -> str:
    """The global models after a round (what a resumed run starts from)."""
    return f"{round_prefix(run, server_round)}global.npz"


# ---------------------------------------------------------------------- Firestore paths


def run_document(run: str) -> str:
    return f"runs/{run}"


def rounds_collection(run: str) -> str:
    return f"{run_document(run)}/rounds"


def round_document(run: str, server_round: int | str) -> str:
    return f"{rounds_collection(run)}/{server_round}"


def invocations_collection(run: str, server_round: int | str) -> str:
    return f"{round_document(run, server_round)}/invocations"


def invocation_document(run: str, server_round: int, call: str) -> str:
    return f"{invocations_collection(run, server_round)}/{call}"
