"""The HTTP boundary shared by both functions: body limits and JSON parsing, the run and round
check, and `as_response`, which turns a handler's answer or error into a JSON response.

Bad requests get a 4xx with a JSON error that names the problem, before anything is written.
"""

from __future__ import annotations

import json

from flwr_kd.serverless import wire
from flwr_kd.serverless.functions.env import FunctionEnv
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.functions.tokens import function_audiences, verify_caller
from flwr_kd.serverless.roundstore import RoundStore


def parse_request(body: bytes, content_type: str | None, env: FunctionEnv) -> dict:
    if len(body) > env.max_body_bytes:
        raise HttpError(413, f"body of {len(body)} bytes exceeds the limit of {env.max_body_bytes}")
    if (content_type or "").split(";")[0].strip() != "application/json":
        raise HttpError(415, f"content type must be application/json, got '{content_type}'")
    if not body:
        raise HttpError(400, "empty body: expected a JSON envelope")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"malformed JSON: {exc}") from exc


def check_run_and_round(rounds: RoundStore, run: str, server_round: int) -> None:
    """404 unless `run` exists in Firestore and has a round `server_round` (0 is set-up)."""
    try:
        config = rounds.get_run(run).get("config", {})
    except KeyError as exc:
        raise HttpError(404, f"unknown run '{run}'") from exc
    last = config.get("num-server-rounds")
    if last is not None and not 0 <= server_round <= int(last):
        raise HttpError(
            404, f"unknown round {server_round} of run '{run}', which has rounds 0-{last}"
        )


def as_response(handler, request) -> tuple[str, int, dict]:
    """(JSON text, status, headers) for a functions-framework (Flask) request; errors become
    `{"error": ...}` with a 4xx status."""
    try:
        verify_caller(
            request.headers.get("Authorization"),
            function_audiences(request.base_url, request.url_root),
        )
        body, content_type = request.get_data(cache=False), request.content_type
        status, payload = handler(body, content_type)
    except HttpError as exc:
        status, payload = exc.status, {"error": exc.message}
    except wire.WireError as exc:
        status, payload = 400, {"error": str(exc)}
    return json.dumps(payload), status, {"Content-Type": "application/json"}
