"""Firestore IAM for the emulated stack. Firestore's IAM stops at the database: an identity
holds `roles/datastore.user` on all of it or on nothing. So each identity gets its own
FIRESTORE_EMULATOR_HOST, a small gRPC server that relays every call to the emulator for the
identities in terraform/'s `firestore_identities`, and answers every call of any other
identity with PERMISSION_DENIED "Missing or insufficient permissions." (as Firestore answers
a caller without the role). Each call is recorded in the `AccessLog` with the permission
Google's table names for it:
https://cloud.google.com/firestore/docs/security/iam (required permissions for API methods).
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from flwr_kd.serverless.policy import AccessLog, DeploymentPolicy

DENIED = "Missing or insufficient permissions."
ENTITIES = "datastore.entities."
#: google.firestore.v1.Firestore methods that stream, and how (the others are unary).
STREAMING = {
    **dict.fromkeys(
        ("BatchGetDocuments", "RunQuery", "RunAggregationQuery", "ExecutePipeline"), "unary_stream"
    ),
    **dict.fromkeys(("Write", "Listen"), "stream_stream"),
}
#: Method -> permission, but Commit and BatchWrite, whose permissions depend on their writes.
PERMISSIONS = {
    "GetDocument": ENTITIES + "get",
    "BatchGetDocuments": ENTITIES + "get",
    "Listen": ENTITIES + "get",
    "ListDocuments": ENTITIES + "list",
    "ListCollectionIds": ENTITIES + "list",
    "RunQuery": ENTITIES + "list",
    "RunAggregationQuery": ENTITIES + "list",
    "PartitionQuery": ENTITIES + "list",
    "ExecutePipeline": ENTITIES + "list",
    "CreateDocument": ENTITIES + "create",
    "UpdateDocument": ENTITIES + "update",
    "DeleteDocument": ENTITIES + "delete",
    "Write": ENTITIES + "update",
    "BeginTransaction": "datastore.databases.get",
    "Rollback": "datastore.databases.get",
}
_DROPPED_METADATA = ("user-agent", "grpc-")


def write_permissions(method: str, request: bytes) -> list[str]:
    """What a Commit or BatchWrite needs: create for a write that must not exist, update for
    one that must, both without a precondition, delete for a delete (Google's table)."""
    from google.cloud.firestore_v1.types import BatchWriteRequest, CommitRequest

    kind = CommitRequest if method == "Commit" else BatchWriteRequest
    needed = []
    for write in kind.deserialize(request).writes:
        if write._pb.HasField("delete"):
            needed.append(ENTITIES + "delete")
            continue
        precondition = write._pb.current_document
        if precondition.HasField("exists"):
            needed.append(ENTITIES + ("update" if precondition.exists else "create"))
        else:
            needed += [ENTITIES + "create", ENTITIES + "update"]
    return list(dict.fromkeys(needed)) or [ENTITIES + "update"]


def _database(context: grpc.ServicerContext) -> str:
    """The database a call names (the client sends it as a routing header)."""
    for key, value in context.invocation_metadata():
        if key in ("google-cloud-resource-prefix", "x-goog-request-params"):
            return value.split("database=", 1)[-1].replace("%2F", "/")
    return ""


class _IdentityHandler(grpc.GenericRpcHandler):
    """Every call to one identity's port: record, then relay or refuse."""

    def __init__(self, gate: FirestoreGate, identity: str) -> None:
        self.gate, self.identity = gate, identity
        self.allowed = identity in gate.policy.firestore_identities

    def service(self, details):
        method = details.method
        name = method.rsplit("/", 1)[-1]
        kind = STREAMING.get(name, "unary_unary")
        upstream = getattr(self.gate.channel, kind)(method)  # bytes in, bytes out

        def relay(request, context):
            metadata = self._check(name, None if kind == "stream_stream" else request, context)
            try:
                answer = upstream(request, metadata=metadata)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())
            return answer if kind == "unary_unary" else _streamed(answer, context)

        return getattr(grpc, f"{kind}_rpc_method_handler")(relay)

    def _check(self, name: str, request: bytes | None, context) -> list:
        """Record the call's permissions; abort it when this identity may not use Firestore.
        Returns the metadata to relay."""
        if name in ("Commit", "BatchWrite") and request is not None:
            permissions = write_permissions(name, request)
        else:
            permissions = [PERMISSIONS.get(name, f"unknown {name}")]
        for permission in permissions:
            self.gate.log.record(
                service="firestore",
                identity=self.identity,
                email=self.gate.policy.identities.get(self.identity, self.identity),
                method=name,
                permission=permission,
                resource=_database(context),
                allowed=self.allowed,
            )
        if not self.allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED)
        return [
            (k, v)
            for k, v in context.invocation_metadata()
            if not k.startswith(":") and not k.startswith(_DROPPED_METADATA)
        ]


def _streamed(responses, context):
    """Relay a stream of answers; an error of the emulator ends it with that error."""
    try:
        yield from responses
    except grpc.RpcError as exc:
        context.abort(exc.code(), exc.details())


class FirestoreGate:
    """The Firestore emulator at `upstream` (host:port), seen through one port per identity."""

    def __init__(self, upstream: str, policy: DeploymentPolicy, log: AccessLog) -> None:
        self.policy, self.log = policy, log
        self.channel = grpc.insecure_channel(upstream)
        self._servers: list[grpc.Server] = []
        self._lock = threading.Lock()

    def serve(self, identity: str) -> dict[str, str]:
        """Open `identity`'s port; returns the environment that makes a process act as it."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((_IdentityHandler(self, identity),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        with self._lock:
            self._servers.append(server)
        return {"FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{port}"}

    def close(self) -> None:
        with self._lock:
            servers, self._servers = self._servers, []
        for server in servers:
            server.stop(grace=None)
        self.channel.close()
