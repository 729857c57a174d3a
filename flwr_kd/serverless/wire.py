"""Messages over HTTP: Flower's own protobuf serialization inside a small JSON envelope, with
large `ArrayRecord`s moved to Cloud Storage and sent by reference.

Envelope: `{"version": 1, "run": ..., "round": r, "message": <base64 Flower Message proto>,
"objects": {<record name>: <object name>}}`, and `"client": <client id>` on messages to a
client function (a pooled function serves many). An offloaded record is one `.npz` object
named after what it is (e.g. `.../outbox/<run>/<r>/train/arrays.npz`); the receiver reads it
back (checksum verified) and puts it into the message again.
"""

from __future__ import annotations

import base64
import binascii
import json

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.app.message import make_message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from flwr_kd.records import record_to_state, state_to_record
from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import AlreadyExists, GcsArrayStore

VERSION = 1
DEFAULT_OFFLOAD_BYTES = 64 * 1024
#: Reply records that travel only as stored objects, whatever their size: logits are the
#: record of what a client said, weights what aggregators read; the driver refuses them inline.
STORED_REPLY_RECORDS = ("logits", "arrays")


class WireError(ValueError):
    """A request or reply body is not a valid envelope; the message names the problem."""


def encode(
    msg: Message,
    *,
    run: str,
    server_round: int,
    store: GcsArrayStore,
    prefix: str,
    offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
    always_store: tuple[str, ...] = (),
    client: str | None = None,
) -> tuple[dict, int]:
    """(envelope, bytes written to Cloud Storage) for `msg`; array records above
    `offload_bytes`, or named in `always_store`, go to `names.record_object(prefix, record)`
    (create-only; an identical retry reuses the object)."""
    objects: dict[str, str] = {}
    written = 0
    if msg.has_content():
        slim = RecordDict()
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord) and (
                record.count_bytes() > offload_bytes or name in always_store
            ):
                obj = names.record_object(prefix, name)
                try:
                    written += store.put(obj, record_to_state(record))
                except AlreadyExists:
                    pass  # written by an earlier attempt of this same message
                objects[name] = obj
            else:
                slim[name] = record
        proto = message_to_proto(make_message(metadata=msg.metadata, content=slim))
    else:
        proto = message_to_proto(msg)
    body = {
        "version": VERSION,
        "run": run,
        "round": server_round,
        "message": base64.b64encode(proto.SerializeToString()).decode(),
        "objects": objects,
        **({"client": client} if client is not None else {}),
    }
    return body, written


def parse_envelope(body: object) -> dict:
    """Check the envelope's fields and types; raise WireError naming what is wrong."""
    if not isinstance(body, dict):
        raise WireError("body must be a JSON object")
    if body.get("version") != VERSION:
        raise WireError(f"unsupported envelope version {body.get('version')!r}, expected {VERSION}")
    for key, kind in (("run", str), ("round", int), ("message", str), ("objects", dict)):
        if not isinstance(body.get(key), kind) or isinstance(body.get(key), bool):
            raise WireError(f"field '{key}' missing or not a {kind.__name__}")
    if not names.is_safe_id(body["run"]):
        raise WireError("field 'run' must be a non-empty name of letters, digits, '.', '_', '-'")
    if body["round"] < 0:
        raise WireError("field 'round' must be >= 0")
    if not isinstance(body.get("client", ""), str):
        raise WireError("field 'client' must be a string")
    return body


def decode_proto(body: dict) -> Message:
    """The Message of an envelope without its offloaded records (nothing is read)."""
    body = parse_envelope(body)
    try:
        proto = ProtoMessage()
        proto.ParseFromString(base64.b64decode(body["message"], validate=True))
        return message_from_proto(proto)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise WireError(f"field 'message' is not a base64 Flower message: {exc}") from exc


def decode(body: dict, store: GcsArrayStore) -> Message:
    """The Message of an envelope, offloaded records read back from Cloud Storage."""
    msg = decode_proto(body)
    if body["objects"]:
        if not msg.has_content():
            raise WireError("objects given for a message without content")
        for name, obj in body["objects"].items():
            if not isinstance(obj, str):
                raise WireError(f"object of record '{name}' must be a string")
            msg.content[name] = state_to_record(store.get(obj))
    return msg


def to_json(body: dict) -> bytes:
    return json.dumps(body).encode()
