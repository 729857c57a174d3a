"""The emulated Cloud Run front end: what Google does to a request before a gen2 function (a
Cloud Run service) sees it, so the emulated stack refuses what Google refuses.

One listener per service on its own 127.0.0.1 port; its URL is the service URL the driver calls
and the audience its ID tokens name. In order, as Google documents it:

- Request size: at most 32 MiB (HTTP/1), else 413
  (https://cloud.google.com/run/quotas, "Maximum HTTP/1 request size").
- Authentication with IAM invocation required: the ID token in `X-Serverless-Authorization`,
  else in `Authorization`, must be signed by Google (the token service's certificates here),
  unexpired, and name the service URL as audience (http/https alike: Cloud Run ends TLS), else
  401; the token's e-mail must hold `roles/run.invoker` on the service (`invokers`), else 403
  (https://cloud.google.com/run/docs/authenticating/service-to-service,
  https://cloud.google.com/run/docs/securing/managing-access). Refusals carry Google's HTML
  error page; the reason goes to the request log, as Cloud Run writes it to Cloud Logging.
- Forwarding: the verified token's signature replaced by `SIGNATURE_REMOVED_BY_GOOGLE`
  (https://cloud.google.com/run/docs/troubleshooting#signature-removed); any other header
  passes as sent.
- Max instances x concurrency: a request that finds every slot busy waits for one (Google:
  "incoming requests queue for up to 60 seconds"), then fails with 429
  (https://cloud.google.com/run/docs/about-instance-autoscaling, "Exceeding maximum
  instances"; request log "The request was aborted because there was no available instance").
- Request timeout: no response within the service's timeout ends the request with 504; the
  instance is not stopped (https://cloud.google.com/run/docs/configuring/request-timeout).
- An instance that drops the connection (crashed) gets the caller a 503
  (https://cloud.google.com/run/docs/troubleshooting#503-errors).
"""

from __future__ import annotations

import html
import http.server
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from flwr_kd.serverless import idtokens
from flwr_kd.serverless.localserver import LocalServer

#: Cloud Run's limit on an HTTP/1 request (headers and body).
MAX_REQUEST_BYTES = 32 * 1024 * 1024
#: How long a request waits for a free instance before its 429 (Google's documented window).
PENDING_SECONDS = 60.0
#: Hop-by-hop headers: a proxy never forwards them (RFC 9110, section 7.6.1).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
#: Google's words for each refusal (the HTML page's second heading).
PAGE_TEXT = {
    401: "Your client does not have permission to the requested URL <code>{path}</code>.",
    403: "Your client does not have permission to get URL <code>{path}</code> from this server.",
    411: "Your client issued a request without a Content-Length.",
    413: "Your client issued a request that was too large.",
    429: "The request was aborted because there was no available instance.",
    503: "The service is unavailable.",
    504: "The request has been terminated because it has reached the maximum request timeout.",
}


@dataclass(frozen=True)
class ServiceSettings:
    """What Terraform sets on one service: who may invoke it, and its limits."""

    invokers: frozenset[str]
    max_instances: int = 1
    concurrency: int = 1
    timeout_seconds: float = 540.0
    max_request_bytes: int = MAX_REQUEST_BYTES
    pending_seconds: float = PENDING_SECONDS


@dataclass(frozen=True)
class RequestLog:
    """One request as Cloud Run's request log records it (never the token)."""

    status: int
    method: str
    path: str
    caller: str | None
    reason: str
    seconds: float

    def line(self) -> str:
        """The entry as one line of the front end's request log file."""
        took = f"{self.seconds:.3f}s"
        return f"{self.status} {self.method} {self.path} {self.caller} {took} {self.reason}\n"


class Refused(Exception):
    """The front end answers `status` itself; `reason` is for the request log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class FrontEnd:
    """Cloud Run's front end for the service `name`, forwarding to `backend_url`; a context
    manager listening while open. `log` holds every request it answered."""

    name: str
    backend_url: str
    settings: ServiceSettings
    certs_url: str
    log: list[RequestLog] = field(default_factory=list)

    def __post_init__(self) -> None:
        capacity = self.settings.max_instances * self.settings.concurrency
        self._slots = threading.BoundedSemaphore(capacity)
        self.busy = 0  # requests being served now (instances x concurrency at most)
        self._busy_lock = threading.Lock()
        self._session = requests.Session()
        self._session.headers.clear()  # forward the caller's headers, not requests' defaults
        adapter = HTTPAdapter(pool_maxsize=capacity)
        self._session.mount("http://", adapter)
        self._listener: LocalServer | None = None

    @property
    def url(self) -> str:
        """The service URL (and the audience of its ID tokens)."""
        assert self._listener is not None, f"the front end of {self.name} is not started"
        return self._listener.url

    def __enter__(self) -> Self:
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the driver's session expects

            def _serve(self):
                front.serve(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format, *args):
                pass

        self._listener = LocalServer(Handler, f"front-end-{self.name}")
        return self

    def __exit__(self, *exc) -> None:
        if self._listener is not None:
            self._listener.stop()
        self._session.close()

    # -- one request ----------------------------------------------------------------------------

    def serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        t0, caller = time.monotonic(), None
        try:
            length = self._content_length(handler)
            try:
                header, token, caller = self._authenticate(handler.headers)
            except Refused:
                _drain(handler, length, limit=length)  # so the caller reads the answer
                raise
            body = handler.rfile.read(length)
            status, headers, content = self._forward(handler, body, header, token)
            reason = ""
        except Refused as refusal:
            status, reason = refusal.status, refusal.reason
            headers, content = self._error_page(refusal.status, handler.path)
            handler.close_connection = True
        seconds = time.monotonic() - t0
        self.log.append(RequestLog(status, handler.command, handler.path, caller, reason, seconds))
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        if handler.close_connection:
            handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(content)

    def _content_length(self, handler) -> int:
        """The body's length: 411 for a body without one, 413 over the size limit (the body is
        read and dropped first, so the caller reads the answer rather than a reset)."""
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            raise Refused(411, "chunked request bodies are not emulated")
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError as exc:
            raise Refused(411, "malformed Content-Length") from exc
        if length > self.settings.max_request_bytes:
            _drain(handler, length, limit=2 * self.settings.max_request_bytes)
            limit = self.settings.max_request_bytes
            raise Refused(413, f"request of {length} bytes over the limit of {limit}")
        return length

    def _authenticate(self, headers) -> tuple[str, str, str]:
        """(header name, token, caller e-mail) of a caller that may invoke this service."""
        header = "X-Serverless-Authorization"
        if not headers.get(header):
            header = "Authorization"
        try:
            token = idtokens.bearer_token(headers.get(header))
            claims = idtokens.signed_claims(token, idtokens.signing_certs(self.certs_url))
            audiences = idtokens.service_audiences(self.url, self.url)
            idtokens.check_issuer_and_audience(claims, audiences)
        except idtokens.TokenRejected as exc:
            raise Refused(exc.status, "The request was not authenticated. " + exc.reason) from exc
        email = idtokens.verified_email(claims)
        if email not in self.settings.invokers:
            raise Refused(
                403,
                f"The request was not authorized to invoke this service: {email!r} lacks "
                f"roles/run.invoker on {self.name}",
            )
        return header, token, email

    def _forward(self, handler, body: bytes, header: str, token: str) -> tuple[int, list, bytes]:
        """The function's answer, once an instance is free: (status, headers, body)."""
        if not self._slots.acquire(timeout=self.settings.pending_seconds):
            raise Refused(429, PAGE_TEXT[429])
        with self._busy_lock:
            self.busy += 1
        try:
            headers = CaseInsensitiveDict(
                {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
            )
            headers[header] = f"Bearer {idtokens.strip_signature(token)}"  # in place, any case
            resp = self._session.request(
                handler.command,
                self.backend_url + handler.path,
                data=body,
                headers=headers,
                timeout=(10, self.settings.timeout_seconds),
                allow_redirects=False,
                stream=True,
            )
            with resp:
                content = resp.raw.read(decode_content=False)
        except requests.Timeout as exc:
            if isinstance(exc, requests.ConnectTimeout):
                raise Refused(503, f"no instance accepted the connection: {exc}") from exc
            raise Refused(504, PAGE_TEXT[504]) from exc
        except requests.ConnectionError as exc:
            raise Refused(
                503,
                "The request failed because either the HTTP response was malformed or "
                "connection to the instance had an error.",
            ) from exc
        finally:
            with self._busy_lock:
                self.busy -= 1
            self._slots.release()
        kept = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP]
        return resp.status_code, kept, content

    @staticmethod
    def _error_page(status: int, path: str) -> tuple[list, bytes]:
        phrase = http.HTTPStatus(status).phrase
        text = PAGE_TEXT.get(status, phrase).format(path=html.escape(path))
        page = (
            '<html><head><meta http-equiv="content-type" content="text/html;charset=utf-8">'
            f"<title>{status} {phrase}</title></head><body text=#000000 bgcolor=#ffffff>"
            f"<h1>Error: {phrase}</h1><h2>{text}</h2><h2></h2></body></html>"
        )
        return [("Content-Type", "text/html; charset=UTF-8")], page.encode()


def _drain(handler, length: int, limit: int) -> None:
    """Read and drop up to `length` body bytes; past `limit` the connection is just closed."""
    left = min(length, limit)
    while left > 0:
        chunk = handler.rfile.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)
