"""Every Cloud Storage object name and Firestore document path of the serverless runtime.

This module is the code half of the layout in docs/serverless.md: terraform/ grants each
identity its managed folders (`clients/<id>/`, `pools/<slug>/`, `aggregators/`, `runs/`,
`public/`), and the names built here are what lies under them. The driver, the functions, the
audit and the benchmarks ask here and build no name themselves, so a change of layout is one
edit in this file. Both sides of the wire import it; it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib

from flwr_kd.data import DataSpec

#: Aggregator calls are named `aggregator:<arch>:<task>`; client calls `<client-id>:<type>`.
AGGREGATOR_CALL = "aggregator"
#: What a client id or pool slug may be: one path segment of an object name.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# ---------------------------------------------------------------------- identities


def is_safe_id(name: str) -> bool:
    """Whether `name` can be a client id or pool slug (one path segment, no `..`)."""
    return bool(_SAFE_ID.match(name)) and ".." not in name


def client_order(client_id: str) -> tuple:
    """Sort key of client ids in partition order: `client-2` before `client-10`, as Terraform
    numbers them (client i holds partition i)."""
    head = client_id.rstrip("0123456789")
    tail = client_id[len(head) :]
    return (head, int(tail) if tail else -1, client_id)


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


def task_name(task_object: str) -> str:
    """`task-<kind>-<i>` of an aggregator task object."""
    return task_object.rsplit("/", 1)[-1].removesuffix(".npz")


def aggregator_call(arch: str, task_object: str) -> str:
    """The invocation id of one aggregator task, named after its task object."""
    return f"{AGGREGATOR_CALL}:{arch}:{task_name(task_object)}"


def is_aggregator_call(call: str) -> bool:
    return call.startswith(f"{AGGREGATOR_CALL}:")


def split_client_call(call: str) -> tuple[str, str]:
    """(client id, message type) of a client invocation id."""
    client_id, message_type = call.split(":", 1)
    return client_id, message_type


# ---------------------------------------------------------------------- a client's root


def pool_root(pool: str) -> str:
    """The managed folder of one architecture pool (`pool` is its slug)."""
    return f"pools/{pool}/"


def client_root(client_id: str, pool: str | None = None) -> str:
    """The folder of everything one client owns or is sent: `data/`, `inbox/`, `state/`,
    `outbox/` (an isolated client's own managed folder, or its place in its pool's)."""
    return f"{pool_root(pool)}clients/{client_id}/" if pool else f"clients/{client_id}/"


def pool_of_root(root: str) -> str | None:
    """The pool slug of a pooled client's root; None for an isolated client."""
    parts = root.split("/")
    return parts[1] if parts[0] == "pools" else None


def client_data_prefix(client_id: str, pool: str | None = None) -> str:
    """Where a client's private partitions lie by default (`FLWR_KD_DATA_PREFIX`)."""
    return client_root(client_id, pool) + "data/"


def public_objects(fingerprint: str) -> tuple[str, str]:
    """(public data, test data) object names of one split."""
    return f"public/{fingerprint}/data.npz", f"public/{fingerprint}/test.npz"


def private_object(data_prefix: str, fingerprint: str) -> str:
    """A client's private partition of one split, under its data prefix."""
    return f"{data_prefix.rstrip('/')}/{fingerprint}/private.npz"


def client_state_uri(bucket: str, root: str) -> str:
    """The `state-uri` a client function uses: its own root, whatever the driver sent."""
    return f"gs://{bucket}/{root}state"


def driver_state_uri(bucket: str, run: str) -> str:
    """The driver's `state-uri`: what the strategy publishes for every client to read (FedMD's
    transfer-learned weights, `pretrained-<arch>`), under `public/`; each client function
    keeps its own state under its root instead (`client_state_uri`)."""
    return f"gs://{bucket}/public/runs/{run}"


def state_object(prefix: str, key: str) -> str:
    """One key's state (e.g. `node-<id>`) under a state prefix."""
    return f"{prefix.rstrip('/')}/{key}.npz"


# ---------------------------------------------------------------------- inbox and outbox


def inbox_prefix(root: str, run: str, server_round: int | str) -> str:
    """Messages the driver wrote to one client in one round; the client reads only these."""
    return f"{root}inbox/{run}/{server_round}/"


def message_prefix(root: str, run: str, server_round: int, message_id: str) -> str:
    """The prefix of one message's offloaded records (see `record_object`)."""
    return inbox_prefix(root, run, server_round) + message_id


def message_object(root: str, run: str, server_round: int, message_id: str) -> str:
    """The message's envelope as the driver sent it: its presence in the inbox is what makes
    a run and round known to the client function (404 otherwise)."""
    return f"{message_prefix(root, run, server_round, message_id)}/envelope.json"


def outbox_prefix(root: str, run: str, server_round: int | str) -> str:
    """Everything one client wrote in one round: reply records and call records. The driver
    believes a reply only if each object it lists lies under this prefix."""
    return f"{root}outbox/{run}/{server_round}/"


def client_replies_prefix(run: str, server_round: int | str, client_id: str) -> str:
    """An isolated client's outbox for one round (for messages that point a user there)."""
    return outbox_prefix(client_root(client_id), run, server_round)


def reply_prefix(root: str, run: str, server_round: int, message_type: str) -> str:
    """The prefix of one reply's stored records (`logits.npz`, `arrays.npz`)."""
    return outbox_prefix(root, run, server_round) + message_type.replace(".", "-")


def record_object(prefix: str, record: str) -> str:
    """One offloaded array record of a message or reply."""
    return f"{prefix}/{record}.npz"


def client_call_records(root: str, run: str, server_round: int, message_type: str) -> str:
    """The folder of one client call's records (`attempt_object`, `reply_object`)."""
    return f"{outbox_prefix(root, run, server_round)}calls/{message_type}/"


def attempt_object(records: str, attempt: int) -> str:
    """One request's claim on a call (create-only, numbered from 1)."""
    return f"{records}attempt-{attempt}.json"


def reply_object(records: str) -> str:
    """The finished call (create-only): what a retry of the same message is answered with."""
    return f"{records}reply.json"


# ---------------------------------------------------------------------- aggregators


def aggregator_prefix(run: str, server_round: int | str, arch: str) -> str:
    """Task inputs (driver) and results (the aggregator of `arch`) of one round."""
    return f"aggregators/{run}/{server_round}/{arch}/"


def aggregator_task_object(run: str, server_round: int, arch: str, kind: str, index: int) -> str:
    return aggregator_prefix(run, server_round, arch) + f"task-{kind}-{index}.npz"


def aggregator_result_object(run: str, server_round: int, arch: str, kind: str) -> str:
    """A distilled student (`kind` "distill") or transfer-learned weights ("train")."""
    name = "student.npz" if kind == "distill" else "pretrained.npz"
    return aggregator_prefix(run, server_round, arch) + name


def aggregator_call_records(run: str, server_round: int, arch: str, task_object: str) -> str:
    """The folder of one aggregator task's call records."""
    return f"{aggregator_prefix(run, server_round, arch)}calls/{task_name(task_object)}/"


# ---------------------------------------------------------------------- the driver's own


def run_prefix(run: str) -> str:
    """What only the driver writes and reads back (`--resume`)."""
    return f"runs/{run}/"


def global_object(run: str, server_round: int) -> str:
    """The global models after a round (what a resumed run starts from)."""
    return f"{run_prefix(run)}global/{server_round}.npz"


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
