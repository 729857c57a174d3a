"""Cloud Storage IAM for the emulated stack: fake-gcs-server lets anybody do anything, Google
does not. A gate is an HTTP proxy in front of fake-gcs-server's JSON API (and its upload and
download endpoints) with one listening port per identity: a process acts as an identity by
pointing STORAGE_EMULATOR_HOST at that identity's port. Each request is mapped to the
permissions it needs, checked against terraform/'s grants (`policy.DeploymentPolicy`),
recorded in the `AccessLog`, and either forwarded or answered as Cloud Storage answers a
caller without the permission (403, its JSON error body).

Roles -> permissions: https://cloud.google.com/storage/docs/access-control/iam-roles
A managed folder's policy covers the objects whose names start with the folder's path
(https://cloud.google.com/storage/docs/managed-folders); a listing is allowed when its prefix
lies inside a folder the identity may list. Replacing an existing object also needs
storage.objects.delete, unless the upload carries ifGenerationMatch=0 (then it only creates,
or fails with 412 upstream).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

from flwr_kd.serverless.policy import AccessLog, DeploymentPolicy, PolicyError

GET, LIST, CREATE, DELETE, UPDATE = (
    f"storage.objects.{p}" for p in ("get", "list", "create", "delete", "update")
)
#: The object roles of Cloud Storage's "IAM roles for Cloud Storage" page, with their object
#: permissions (none of them holds a storage.buckets.* permission: those are always denied).
ROLE_PERMISSIONS = {
    "roles/storage.objectViewer": {GET, LIST},
    "roles/storage.objectCreator": {CREATE},
    "roles/storage.objectUser": {GET, LIST, CREATE, DELETE, UPDATE},
    "roles/storage.objectAdmin": {GET, LIST, CREATE, DELETE, UPDATE},
}
_PATH = re.compile(r"/(?:(upload|download)/)?storage/v1/b(?:/([^/]+)(?:/o(?:/(.+))?)?)?")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class Check:
    """One permission a request needs on one resource (object name, list prefix or bucket)."""

    permission: str
    resource: str
    on: str = "object"  # "object" | "bucket" (what Cloud Storage's error message names)


class StorageIam:
    """terraform/'s storage grants, applied to the emulated arrays bucket."""

    def __init__(self, policy: DeploymentPolicy, bucket: str) -> None:
        unknown = {g.role for g in policy.storage_grants} - set(ROLE_PERMISSIONS)
        if unknown:
            raise PolicyError(f"the storage gate does not know the role(s) {sorted(unknown)}")
        self.policy, self.bucket = policy, bucket

    def allows(self, identity: str, bucket: str, check: Check) -> bool:
        if bucket != self.bucket or not check.permission.startswith("storage.objects."):
            return False
        return any(
            check.permission in ROLE_PERMISSIONS[g.role] and check.resource.startswith(g.folder)
            for g in self.policy.grants_of(identity)
        )


@dataclass(frozen=True)
class Access:
    """What a request is, in the JSON API's terms, and the checks it must pass."""

    method: str  # "objects.get", "objects.insert", ...
    bucket: str
    checks: tuple[Check, ...]
    upload_id: str | None = None  # a resumable upload's later request


def _upload_name(query: dict, headers, body: bytes) -> str:
    """The object name of an upload: in the query, else in the JSON metadata (a resumable
    upload's first request, or the first part of a multipart one)."""
    if query.get("name"):
        return query["name"]
    boundary = re.search(r'boundary="?([^";]+)"?', headers.get("Content-Type", ""))
    try:
        if boundary:  # the metadata part: its headers, a blank line, the JSON
            part = body.split(b"--" + boundary.group(1).encode(), 2)[1]
            body = part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
        return str(json.loads(body or b"{}").get("name", ""))
    except (IndexError, ValueError, AttributeError):
        return ""


def classify(command: str, path: str, query: dict, headers, body: bytes, exists) -> Access:
    """The API method and checks of one request; `exists(bucket, name)` says whether an upload
    would replace an object (which also needs delete)."""
    match = _PATH.fullmatch(path)
    if match is None:
        return Access(f"unsupported {command} {path}", "", (Check("unsupported", path),))
    endpoint, bucket, raw_name = match.groups()
    bucket = unquote(bucket or "")
    if endpoint == "upload" and "upload_id" in query:
        return Access("objects.insert", bucket, (), upload_id=query["upload_id"])
    if endpoint == "upload" and command == "POST" and raw_name is None:
        name = _upload_name(query, headers, body)
        checks = [Check(CREATE, name)]
        generation = query.get("ifGenerationMatch")
        if generation != "0" and (generation is not None or exists(bucket, name)):
            checks.append(Check(DELETE, name))
        return Access("objects.insert", bucket, tuple(checks))
    if raw_name is not None and "/" not in raw_name:  # one object (its name is %-encoded)
        name = unquote(raw_name)
        method, permission = {
            "GET": ("objects.get", GET),
            "HEAD": ("objects.get", GET),
            "DELETE": ("objects.delete", DELETE),
            "PATCH": ("objects.patch", UPDATE),
            "PUT": ("objects.update", UPDATE),
        }.get(command, (f"objects {command}", "unsupported"))
        return Access(method, bucket, (Check(permission, name),))
    if raw_name is None and path.endswith("/o") and command == "GET" and endpoint is None:
        return Access("objects.list", bucket, (Check(LIST, query.get("prefix", ""), "bucket"),))
    if bucket and raw_name is None and not path.endswith("/o") and command == "GET":
        return Access("buckets.get", bucket, (Check("storage.buckets.get", bucket, "bucket"),))
    return Access(f"unsupported {command} {path}", bucket, (Check("unsupported", path),))


def denied_body(email: str, check: Check) -> bytes:
    """Cloud Storage's 403 for a caller without the permission (JSON API error format:
    https://cloud.google.com/storage/docs/json_api/v1/status-codes)."""
    message = (
        f"{email} does not have {check.permission} access to the Google Cloud Storage "
        f"{check.on}. Permission '{check.permission}' denied on resource (or it may not exist)."
    )
    error = {"domain": "global", "reason": "forbidden", "message": message}
    return json.dumps({"error": {"code": 403, "message": message, "errors": [error]}}).encode()


class StorageGate:
    """fake-gcs-server at `upstream`, seen through one port per identity (`serve`)."""

    def __init__(
        self, upstream: str, bucket: str, policy: DeploymentPolicy, log: AccessLog
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.policy, self.log = policy, log
        self.iam = StorageIam(policy, bucket)
        self._servers: list[ThreadingHTTPServer] = []
        self._uploads: dict[str, str] = {}  # resumable upload id -> the identity that began it
        self._lock = threading.Lock()

    def serve(self, identity: str) -> dict[str, str]:
        """Open `identity`'s port; returns the environment that makes a process act as it."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _GateHandler)
        server.daemon_threads = True
        server.gate, server.identity = self, identity
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(
            target=server.serve_forever, name=f"storage-gate-{identity}", daemon=True
        ).start()
        with self._lock:
            self._servers.append(server)
        return {"STORAGE_EMULATOR_HOST": server.url}

    def close(self) -> None:
        with self._lock:
            servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
            server.server_close()

    # -- used by the handler --------------------------------------------------------------

    def exists(self, bucket: str, name: str) -> bool:
        path = f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        return self.forward("GET", path, {}, b"")[0] == 200

    def decide(self, identity: str, access: Access) -> Check | None:
        """Record each check of `access` as `identity`; the first denied one, or None."""
        checks = access.checks
        if access.upload_id is not None:  # its first request was checked: who sent that?
            with self._lock:
                began = self._uploads.get(access.upload_id)
            if began == identity:
                return None
            checks = (Check(CREATE, f"upload {access.upload_id}"),)
        denied = None
        for check in checks:
            allowed = access.upload_id is None and self.iam.allows(identity, access.bucket, check)
            self.log.record(
                service="storage",
                identity=identity,
                email=self.policy.identities.get(identity, identity),
                method=access.method,
                permission=check.permission,
                resource=check.resource,
                allowed=allowed,
            )
            denied = denied or (None if allowed else check)
        return denied

    def began_upload(self, identity: str, location: str) -> None:
        upload_id = parse_qs(urlsplit(location).query).get("upload_id", [""])[0]
        with self._lock:
            self._uploads[upload_id] = identity

    def forward(self, command: str, path: str, headers: dict, body: bytes):
        """(status, headers, body) of the request sent to fake-gcs-server."""
        target = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
        try:
            conn.request(command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()


class _GateHandler(BaseHTTPRequestHandler):
    """One request to one identity's port: decide, then forward or refuse."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the AccessLog is the record
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        gate, identity = self.server.gate, self.server.identity
        body = self._body()
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        access = classify(self.command, split.path, query, self.headers, body, gate.exists)
        denied = gate.decide(identity, access)
        if denied is not None:
            email = gate.policy.identities.get(identity, identity)
            self._reply(403, [("Content-Type", "application/json")], denied_body(email, denied))
            return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in _HOP_BY_HOP | {"host", "accept-encoding", "content-length"}
        }
        status, out_headers, data = gate.forward(self.command, self.path, headers, body)
        media = split.path.startswith("/download/") or query.get("alt") == "media"
        if not media:  # links in metadata (mediaLink, resumable Location) lead back here
            data = data.replace(gate.upstream.encode(), self.server.url.encode())
        out = []
        for key, value in out_headers:
            if key.lower() == "location":
                value = value.replace(gate.upstream, self.server.url)
                gate.began_upload(identity, value)
            if key.lower() not in _HOP_BY_HOP | {"content-length"}:
                out.append((key, value))
        self._reply(status, out, data)

    def _reply(self, status: int, headers: list, data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle
