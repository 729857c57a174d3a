"""`CloudFunctionGrid`: a Flower `Grid` whose nodes are client Cloud Functions.

Each Message goes into its client's inbox on Cloud Storage (its envelope, and its large
arrays), then out as an HTTP POST to the client's function URL (Google ID token when deployed),
in Flower's own serialization (`flwr_kd.serverless.wire`). Calls run with bounded concurrency,
a per-call timeout, and retries with exponential backoff on 429/5xx/409/connection
errors/timeouts. Message ids are deterministic (run, round, client, type), and functions
answer a repeated id from their record, so a retried call never counts twice, and a resumed
driver re-sends the same ids. A reply counts only as far as the client could have written it
(`trust`); with an `InvocationLog`, each call's invocation document is written from the
function's call records.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import requests
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from flwr_kd import protocol
from flwr_kd.serverless import names, wire
from flwr_kd.serverless.arraystore import AlreadyExists, GcsArrayStore
from flwr_kd.serverless.invocations import InvocationLog
from flwr_kd.serverless.trust import UntrustedReply, trusted_reply

#: Transient answers, retried with backoff: 409 (an earlier attempt of the call still runs),
#: 429 (Cloud Run's front end: every instance busy), 5xx (including a function's 503/504).
RETRY_STATUSES = (409, 429, 500, 502, 503, 504)


@dataclass(frozen=True)
class ClientEndpoint:
    """One client's function and its root on Cloud Storage (`names.client_root` unless
    Terraform says otherwise); `data_prefix` is where its private data goes (under the root)."""

    client_id: str
    url: str
    arch: str
    root: str = ""
    data_prefix: str = ""

    def __post_init__(self) -> None:
        root = self.root or names.client_root(self.client_id)
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "data_prefix", self.data_prefix or root + "data/")
        if not self.data_prefix.startswith(root):
            raise ValueError(
                f"data prefix {self.data_prefix} of client {self.client_id} lies outside its "
                f"root {root}"
            )


@dataclass
class CallRecord:
    """What one call cost, seen from the driver (for per-invocation overhead)."""

    client_id: str
    message_type: str
    server_round: int
    seconds: float
    compute_seconds: float
    bytes_request: int
    bytes_reply: int
    bytes_objects: int
    error: str = ""


def google_id_token_auth() -> Callable[[str], dict]:
    """Authorization headers with a Google ID token for each function URL (cached per URL)."""
    import google.auth.transport.requests
    import google.oauth2.id_token

    cache: dict[str, tuple[str, float]] = {}
    lock = threading.Lock()

    def headers(audience: str) -> dict:
        with lock:
            token, expires = cache.get(audience, ("", 0.0))
            if time.time() > expires:
                token = google.oauth2.id_token.fetch_id_token(
                    google.auth.transport.requests.Request(), audience
                )
                cache[audience] = (token, time.time() + 45 * 60)  # tokens live 60 minutes
        return {"Authorization": f"Bearer {token}"}

    return headers


@dataclass
class GridOptions:
    max_concurrency: int = 8
    call_timeout: float = 600.0  # seconds per attempt
    retries: int = 4
    backoff: float = 0.5  # seconds, doubled per retry
    offload_bytes: int = wire.DEFAULT_OFFLOAD_BYTES
    auth: Callable[[str], dict] | None = None  # None: no Authorization header (emulators)
    calls: list[CallRecord] = field(default_factory=list)


class CloudFunctionGrid(Grid):
    def __init__(
        self,
        endpoints: list[ClientEndpoint],
        store: GcsArrayStore,
        run_id: str,
        options: GridOptions | None = None,
        log: InvocationLog | None = None,
    ) -> None:
        self.options = options or GridOptions()
        self.store, self.run_id, self.log = store, run_id, log
        #: The latest round a message went out for (the fan-out's tasks belong to it).
        self.current_round = 0
        self.endpoints = {names.node_id_for(e.client_id): e for e in endpoints}
        self._run = Run.create_empty(run_id=0)
        self._pool = ThreadPoolExecutor(
            max_workers=self.options.max_concurrency, thread_name_prefix="flwr-kd-call"
        )
        self._futures: dict[str, Future] = {}
        self.session = requests.Session()
        retry = Retry(
            total=self.options.retries,
            connect=self.options.retries,
            read=self.options.retries,
            status=self.options.retries,
            backoff_factor=self.options.backoff,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=None,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=self.options.max_concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    # -- Grid API ----------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.endpoints)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            endpoint = self.endpoints.get(msg.metadata.dst_node_id)
            if endpoint is None:
                raise ValueError(f"no client function for node {msg.metadata.dst_node_id}")
            server_round = round_of(msg)
            self.current_round = max(self.current_round, server_round)
            mid = names.message_id(
                self.run_id, server_round, endpoint.client_id, msg.metadata.message_type
            )
            msg.metadata.__dict__["_message_id"] = mid
            self._futures[mid] = self._pool.submit(self._call, msg, endpoint, server_round)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        done = [mid for mid in message_ids if mid in self._futures and self._futures[mid].done()]
        return [self._futures.pop(mid).result() for mid in done]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        ids = list(self.push_messages(messages))
        wait([self._futures[mid] for mid in ids], timeout=timeout)
        replies = list(self.pull_messages(ids))
        for mid, msg in zip(ids, messages):  # stragglers past the deadline
            if mid in self._futures:
                self._futures.pop(mid).cancel()
                replies.append(
                    error_reply(msg, f"no reply within the round deadline of {timeout}s")
                )
        return replies

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()

    # -- one call -------------------------------------------------------------------------------

    def _call(self, msg: Message, endpoint: ClientEndpoint, server_round: int) -> Message:
        t0 = time.perf_counter()
        mid, root = msg.metadata.message_id, endpoint.root
        body, written = wire.encode(
            msg,
            run=self.run_id,
            server_round=server_round,
            store=self.store,
            prefix=names.message_prefix(root, self.run_id, server_round, mid),
            offload_bytes=self.options.offload_bytes,
            client=endpoint.client_id,
        )
        data = wire.to_json(body)
        record = CallRecord(
            endpoint.client_id, msg.metadata.message_type, server_round, 0.0, 0.0, len(data), 0, 0
        )
        call = names.client_call(endpoint.client_id, msg.metadata.message_type)
        if self.log is not None:
            self.log.started(server_round, call, mid)
        try:
            with contextlib.suppress(AlreadyExists):  # sent before (a resumed driver)
                written += self.store.put_json(
                    names.message_object(root, self.run_id, server_round, mid), body
                )
            record.bytes_objects = written
            payload = self.post(endpoint.url, data, record)
            reply = trusted_reply(
                payload,
                msg,
                client_id=endpoint.client_id,
                root=root,
                run=self.run_id,
                server_round=server_round,
                store=self.store,
            )
            record.compute_seconds = float(payload.get("timing", {}).get("compute", 0.0))
            record.bytes_objects += int(payload.get("stored_bytes", 0))
        except UntrustedReply as exc:
            record.error = f"untrusted reply: {exc}"
            reply = error_reply(msg, f"client function {endpoint.client_id}: {record.error}")
        except Exception as exc:  # noqa: BLE001 - any failure is this node's failed reply
            record.error = f"{type(exc).__name__}: {exc}"
            reply = error_reply(msg, f"client function {endpoint.client_id} failed: {record.error}")
        record.seconds = time.perf_counter() - t0
        self.options.calls.append(record)
        if self.log is not None:
            records = names.client_call_records(
                root, self.run_id, server_round, msg.metadata.message_type
            )
            self.log.finished(server_round, call, records, record.error or None)
        return reply

    def post(self, url: str, data: bytes, record: CallRecord | None = None) -> dict:
        """POST `data` to a function (retried as the session says); its JSON answer, or
        RuntimeError naming the HTTP status and the function's error."""
        headers = {
            "Content-Type": "application/json",
            **(self.options.auth(url) if self.options.auth else {}),
        }
        resp = self.session.post(
            url, data=data, headers=headers, timeout=(10, self.options.call_timeout)
        )
        if record is not None:
            record.bytes_reply = len(resp.content)
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {_error_text(resp)}")
        return resp.json()


def round_of(msg: Message) -> int:
    """The server round a message belongs to (0 before round 1, e.g. architecture queries)."""
    if msg.has_content() and protocol.CONFIG in msg.content:
        return int(msg.content[protocol.CONFIG].get("server-round", 0))
    return 0


def error_reply(msg: Message, reason: str) -> Message:
    reply = Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=msg)
    reply.metadata.__dict__["_message_id"] = f"{msg.metadata.message_id}.error"
    return reply


def _error_text(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text[:200]))
    except ValueError:
        return resp.text[:200]
