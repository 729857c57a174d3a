"""What the driver believes of a client's reply: only what the addressed client could have
written.

A client function can create objects in its own outbox and nowhere else (terraform/'s managed
folders), so a reply is taken only if every object it lists lies under that client's outbox
for that run and round, each object's SHA-256 matches (`arraystore`), its weights and logits
arrive as such objects (never inline in the JSON, where nothing records them), and it answers
the message it was sent, from the node it was sent to. Anything else is refused with a reason
that the round records beside the left-out reply.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message

from flwr_kd.serverless import names, wire
from flwr_kd.serverless.arraystore import GcsArrayStore


class UntrustedReply(ValueError):
    """A reply the addressed client cannot have written as it is; the message says why."""


def trusted_reply(
    payload: object,
    sent: Message,
    *,
    client_id: str,
    root: str,
    run: str,
    server_round: int,
    store: GcsArrayStore,
) -> Message:
    """The reply in `payload` to the message `sent` to `client_id` (whose root is `root`),
    read back from its outbox; `UntrustedReply` (or the store's errors) otherwise."""
    try:
        body = wire.parse_envelope(payload)
    except wire.WireError as exc:
        raise UntrustedReply(f"not a reply envelope: {exc}") from exc
    if (body["run"], body["round"]) != (run, server_round):
        raise UntrustedReply(
            f"reply for run '{body['run']}' round {body['round']}, "
            f"sent in run '{run}' round {server_round}"
        )
    outbox = names.outbox_prefix(root, run, server_round)
    for record, obj in body["objects"].items():
        if not isinstance(obj, str) or not obj.startswith(outbox):
            raise UntrustedReply(
                f"record '{record}' points at {obj!r}, outside client {client_id}'s outbox {outbox}"
            )
    slim = wire.decode_proto(body)
    inline = [
        name
        for name in wire.STORED_REPLY_RECORDS
        if name not in body["objects"] and _has_arrays(slim, name)
    ]
    if inline:
        raise UntrustedReply(
            f"record(s) {', '.join(inline)} sent inline; weights and logits count only as "
            f"objects in {outbox}"
        )
    reply = wire.decode(body, store)
    node = names.node_id_for(client_id)
    if reply.metadata.src_node_id != node:
        raise UntrustedReply(f"reply from node {reply.metadata.src_node_id}, sent to node {node}")
    if reply.metadata.reply_to_message_id != sent.metadata.message_id:
        raise UntrustedReply(
            f"reply to message {reply.metadata.reply_to_message_id!r}, "
            f"sent {sent.metadata.message_id!r}"
        )
    return reply


def _has_arrays(msg: Message, record: str) -> bool:
    return msg.has_content() and isinstance(msg.content.get(record), ArrayRecord)
