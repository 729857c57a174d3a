"""The HTTP boundary shared by both functions: body limits and JSON parsing, the run and round
check, and `as_response`, which turns a handler's answer or error into a JSON response.

Bad requests get a 4xx with a JSON error that names the problem, before anything is written.
"""

from __future__ import annotations

import json

from flwr_kd.serverless import wire
from flwr_kd.serverless.arraystore import ArrayStoreError, GcsArrayStore
from flwr_kd.serverless.functions.env import FunctionEnv
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.functions.tokens import (
    caller_authorization,
    function_audiences,
    verify_caller,
)


def parse_request(body: bytes, content_type: str | None, env: FunctionEnv) -> dict:
    if len(body) > env.max_body_bytes:
        raise HttpError(413, f"body of {len(body)} bytes exceeds the limit of {env.max_body_bytes}")
    if (content_type or "").split(";")[0].strip() != "application/json":
        raise HttpError(415, f"content type must be application/json, got '{content_type}'")
    if not body:
        raise HttpError(400, "empty body: expected a JSON envelope")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, too many digits
        raise HttpError(400, f"malformed JSON: {exc}") from exc
    except RecursionError as exc:
        raise HttpError(400, "malformed JSON: nested too deeply") from exc


def check_run_and_round(
    store: GcsArrayStore, sent: str, run: str, server_round: int, what: str
) -> None:
    """404 unless the driver wrote `sent` (the message or task object of this request): the
    function knows runs and rounds only by what the driver put into its folder."""
    try:
        known = store.exists(sent)
    except ArrayStoreError as exc:  # a name no object can have
        raise HttpError(400, str(exc)) from exc
    if not known:
        raise HttpError(404, f"unknown run '{run}' or round {server_round}: no {what} {sent}")


def as_response(handler, request) -> tuple[str, int, dict]:
    """(JSON text, status, headers) for a functions-framework (Flask) request; errors become
    `{"error": ...}` with a 4xx status. The handler learns the verified caller's e-mail
    (`caller`, None when the function does not verify tokens) to record it."""
    try:
        caller = verify_caller(
            caller_authorization(request.headers),
            function_audiences(request.base_url, request.url_root),
        )
        body, content_type = request.get_data(cache=False), request.content_type
        status, payload = handler(body, content_type, caller=caller)
    except HttpError as exc:
        status, payload = exc.status, {"error": exc.message}
    except wire.WireError as exc:
        status, payload = 400, {"error": str(exc)}
    return json.dumps(payload), status, {"Content-Type": "application/json"}
