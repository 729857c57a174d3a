"""What the client and aggregator Cloud Functions do, independent of the HTTP framework.

`cloud/main.py` only adapts functions-framework requests to `handle_client` and
`handle_aggregator`. The client runs the very same `KDClient` handlers as the simulation, on
its private data from its own Cloud Storage prefix. Bad requests get a 4xx with a JSON error
that names the problem, before anything is written.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from flwr_kd import faults, protocol
from flwr_kd.client import ClientData, KDClient
from flwr_kd.data import DataSpec
from flwr_kd.models import ModelSpec, create_model, state_to_numpy
from flwr_kd.serverless import taskcodec, wire
from flwr_kd.serverless.arraystore import AlreadyExists, ArrayStoreError, GcsArrayStore
from flwr_kd.serverless.roundstore import DONE, FAILED, RoundStore
from flwr_kd.tasks import run_distill_task, run_local_train_task

MAX_BODY_BYTES = 32 * 1024 * 1024
#: A gen2 HTTP function runs at most 60 minutes: a call still "running" after that was
#: abandoned by a crashed instance, and a retry takes it over.
INVOCATION_LEASE_SECONDS = 3600
#: Reply records kept on Cloud Storage whatever their size (logits: the record of what a
#: client said; weights: what aggregators read).
ALWAYS_STORED = ("logits", "arrays")
#: Where Google publishes the keys that sign its ID tokens.
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"


def data_fingerprint(config) -> str:
    """Names the data split a message's config describes, so a new split never reads old data."""
    spec = DataSpec.from_config(dict(config))
    return hashlib.sha256(json.dumps(spec.to_config(), sort_keys=True).encode()).hexdigest()[:16]


def public_objects(fingerprint: str) -> tuple[str, str]:
    """(public data, test data) object names of one split."""
    return f"public/{fingerprint}/data.npz", f"public/{fingerprint}/test.npz"


def private_object(data_prefix: str, fingerprint: str) -> str:
    return f"{data_prefix.rstrip('/')}/{fingerprint}/private.npz"


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def node_id_for(client_id: str) -> int:
    """A stable Flower node id (a positive int) for a client id."""
    return zlib.crc32(client_id.encode()) + 1


@dataclass(frozen=True)
class FunctionEnv:
    bucket: str
    arch: str
    database: str
    client_id: str = ""
    data_prefix: str = ""
    max_body_bytes: int = MAX_BODY_BYTES
    #: FLWR_KD_ONE_INSTANCE=1: at most one instance with concurrency 1 (Terraform deploys client
    #: functions so), so a request that is being served while its call's record says
    #: "running" knows that earlier attempt died with its instance, and takes it over.
    one_instance: bool = False

    @classmethod
    def from_environ(cls, kind: str) -> FunctionEnv:
        required = ["FLWR_KD_BUCKET", "FLWR_KD_ARCH"]
        if kind == "client":
            required += ["FLWR_KD_CLIENT_ID", "FLWR_KD_DATA_PREFIX"]
        missing = [name for name in required if not os.environ.get(name)]
        if missing:
            raise RuntimeError(
                f"{kind} function misconfigured: environment variable(s) {', '.join(missing)} not set"
            )
        return cls(
            bucket=os.environ["FLWR_KD_BUCKET"],
            arch=os.environ["FLWR_KD_ARCH"],
            database=os.environ.get("FLWR_KD_FIRESTORE_DATABASE", "(default)"),
            client_id=os.environ.get("FLWR_KD_CLIENT_ID", ""),
            data_prefix=os.environ.get("FLWR_KD_DATA_PREFIX", ""),
            max_body_bytes=int(os.environ.get("FLWR_KD_MAX_BODY_BYTES", MAX_BODY_BYTES)),
            one_instance=os.environ.get("FLWR_KD_ONE_INSTANCE") == "1",
        )


@functools.lru_cache(maxsize=1)
def _stores(bucket: str, database: str) -> tuple[GcsArrayStore, RoundStore]:
    return GcsArrayStore(bucket), RoundStore(database=database)


#: Seconds the signing certificates are kept before they are fetched again (Google rotates its
#: keys over days; its certificates endpoint says max-age of a few hours).
CERTS_TTL_SECONDS = 300
_certs_cache: dict[str, tuple[float, dict]] = {}


def signing_certs(url: str) -> dict:
    """{key id: PEM certificate} from `url`, cached for CERTS_TTL_SECONDS; 503 when unreachable
    (a retry may find it back; the caller's token is not at fault)."""
    cached = _certs_cache.get(url)
    if cached and time.monotonic() - cached[0] < CERTS_TTL_SECONDS:
        return cached[1]
    import requests

    try:
        resp = requests.get(url, timeout=10)
        resp.raise_for_status()
        certs = resp.json()
    except (requests.RequestException, ValueError) as exc:
        raise HttpError(
            503, f"cannot fetch the ID-token signing certificates: {type(exc).__name__}"
        ) from exc
    _certs_cache[url] = (time.monotonic(), certs)
    return certs


def verify_caller(authorization: str | None, audiences: tuple[str, ...] = ()) -> None:
    """With FLWR_KD_VERIFY_TOKENS=1, accept only a valid Google ID token of FLWR_KD_INVOKER
    (on top of Cloud Run's own IAM check) whose audience is this function's URL.

    Signatures are checked against Google's public certificates, or those at
    FLWR_KD_TOKEN_CERTS_URL (a local signer's, so the emulated stack can test this). Errors
    never repeat the token (it is a credential until it expires)."""
    if os.environ.get("FLWR_KD_VERIFY_TOKENS") != "1":
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise HttpError(401, "missing 'Authorization: Bearer <Google ID token>' header")
    import google.auth.exceptions
    import google.auth.jwt

    token = authorization[len("Bearer ") :].strip()
    certs = signing_certs(os.environ.get("FLWR_KD_TOKEN_CERTS_URL") or GOOGLE_CERTS_URL)
    try:
        claims = google.auth.jwt.decode(token, certs=certs)
    except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
        reason = str(exc)
        for part in [token, *token.split(".")]:
            if part:
                reason = reason.replace(part, "<redacted>")
        raise HttpError(401, f"invalid ID token: {reason[:200]}") from exc
    if claims.get("iss") not in ("accounts.google.com", "https://accounts.google.com"):
        raise HttpError(401, f"ID token issued by {claims.get('iss')!r}, not Google")
    if claims.get("aud") not in audiences:
        raise HttpError(401, f"ID token for audience {claims.get('aud')!r}, not this function")
    invoker = os.environ.get("FLWR_KD_INVOKER", "")
    if not invoker or claims.get("email") != invoker or not claims.get("email_verified", False):
        raise HttpError(403, "caller is not the driver's service account")


def function_audiences(base_url: str, url_root: str) -> tuple[str, ...]:
    """The URLs a token for this function may name. Cloud Run ends TLS in front of the
    container, which therefore sees `http://`; the driver asks for `https://` tokens. (Cloud
    Run routes by host name, so the Host header is this function's own.)"""
    urls = {u.rstrip("/") for u in (base_url, url_root)}
    return tuple(
        sorted(urls | {"https://" + u.split("://", 1)[1] for u in urls if u.startswith("http://")})
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


# ---------------------------------------------------------------------------- client


@functools.lru_cache(maxsize=2)
def _client_data(bucket: str, data_prefix: str, fingerprint: str) -> ClientData:
    store, _ = _stores(bucket, os.environ.get("FLWR_KD_FIRESTORE_DATABASE", "(default)"))
    private = store.get(private_object(data_prefix, fingerprint))
    public_name, test_name = public_objects(fingerprint)
    public = store.get(public_name)
    test = store.get(test_name) if store.exists(test_name) else {}
    spec = ModelSpec(
        int(private["num_classes"]),
        int(private["train_x"].shape[1]),
        int(private["train_x"].shape[2]),
    )
    return ClientData(
        private["train_x"],
        private["train_y"],
        private["holdout_x"],
        private["holdout_y"],
        spec,
        public_x=public["x"],
        test_x=test.get("x"),
        test_y=test.get("y"),
    )


@functools.lru_cache(maxsize=4)
def _model_shapes(arch: str, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_to_numpy(create_model(arch, spec)).items()}


def payload_problem(msg: Message, env: FunctionEnv, config: ConfigRecord) -> str | None:
    """Why the arrays a message carries cannot be this client's model or public inputs (a 400
    before anything runs or is written), or None."""
    if not msg.has_content() or not (
        protocol.ARRAYS in msg.content or protocol.PUBLIC in msg.content
    ):
        return None
    try:
        spec = _client_data(env.bucket, env.data_prefix, data_fingerprint(config)).model_spec
    except ArrayStoreError:
        return None  # no data for this split: the handler answers with an error reply, as before
    if protocol.ARRAYS in msg.content:
        expected = _model_shapes(env.arch, spec)
        got = {k: tuple(v.shape) for k, v in msg.content[protocol.ARRAYS].items()}
        if got.keys() != expected.keys():
            return f"weights do not fit '{env.arch}': {len(got)} arrays, expected {len(expected)}"
        wrong = next((k for k in expected if got[k] != expected[k]), None)
        if wrong:
            return f"weights do not fit '{env.arch}': '{wrong}' has shape {got[wrong]}, expected {expected[wrong]}"
    if (
        protocol.PUBLIC in msg.content and "x" in msg.content[protocol.PUBLIC]
    ):  # FedDF's inputs (FedMD's: indices)
        shape = tuple(msg.content[protocol.PUBLIC]["x"].shape)
        want = (spec.in_chans, spec.img_size, spec.img_size)
        if len(shape) != 4 or shape[1:] != want:
            return f"public inputs must have shape (n, {', '.join(map(str, want))}), got {shape}"
    return None


def load_function_data(context: Context, config: ConfigRecord) -> ClientData:
    """`KDClient.load_data` inside the client function: its own prefix, nothing else."""
    env = FunctionEnv.from_environ("client")
    return _client_data(env.bucket, env.data_prefix, data_fingerprint(config))


CLIENT_APP = KDClient(load_data=load_function_data).register(ClientApp())


def handle_client(
    body: bytes, content_type: str | None, env: FunctionEnv | None = None
) -> tuple[int, dict]:
    t0 = time.perf_counter()
    env = env or FunctionEnv.from_environ("client")
    envelope = wire.parse_envelope(parse_request(body, content_type, env))
    store, rounds = _stores(env.bucket, env.database)
    run, server_round = envelope["run"], envelope["round"]
    check_run_and_round(rounds, run, server_round)
    own = f"runs/{run}/rounds/{server_round}/messages/{env.client_id}/"
    if not all(isinstance(o, str) and o.startswith(own) for o in envelope["objects"].values()):
        raise HttpError(403, f"message objects must lie under {own}")
    try:
        msg = wire.decode(envelope, store)
    except ArrayStoreError as exc:
        raise HttpError(400, str(exc)) from exc
    node = node_id_for(env.client_id)
    if msg.metadata.dst_node_id != node:
        raise HttpError(
            400,
            f"message addressed to node {msg.metadata.dst_node_id}, this is client '{env.client_id}' (node {node})",
        )
    config = msg.content.get(protocol.CONFIG) if msg.has_content() else None
    if config is not None and "arch" in config and str(config["arch"]) != env.arch:
        raise HttpError(
            400, f"message for architecture '{config['arch']}', this client runs '{env.arch}'"
        )
    problem = payload_problem(msg, env, config) if config is not None else None
    if problem:
        raise HttpError(400, problem)
    try:
        plan = (
            faults.FaultPlan.from_config(config, serverless=True)
            if config is not None
            else faults.FaultPlan()
        )
    except (TypeError, ValueError) as exc:
        raise HttpError(400, f"bad fault-injection settings: {exc}") from exc
    call = f"{env.client_id}:{msg.metadata.message_type}"
    prior = rounds.begin_invocation(run, server_round, call, msg.metadata.message_id)
    attempt = 1
    if prior is not None:
        attempt = int(prior.get("attempts", 2))
        if prior.get("status") == DONE and prior.get("message_id") == msg.metadata.message_id:
            return 200, json.loads(prior["reply"])  # a retry: the same answer, computed once
        if prior.get("status") not in (FAILED, DONE):
            started = prior.get("started")
            expired = (
                started is not None
                and (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
                > INVOCATION_LEASE_SECONDS
            )
            if not (expired or env.one_instance):
                raise HttpError(409, f"call {call} of round {server_round} is in progress")
            rounds.note_invocation(
                run,
                server_round,
                call,
                f"attempt {attempt}: took over an earlier attempt that never finished (its instance died)",
            )
        rounds.restart_invocation(run, server_round, call)
    if config is not None and "state-uri" in config:  # a client keeps state under its own prefix
        config["state-uri"] = f"gs://{env.bucket}/clients/{env.client_id}/state"
    context = Context(
        run_id=msg.metadata.run_id,
        node_id=node,
        node_config={"arch": env.arch, "client-id": env.client_id},
        state=RecordDict(),
        run_config={},
    )
    fault = plan.draw(server_round, env.client_id, msg.metadata.message_type, attempt)
    if fault is not None:
        inject_call_fault(fault, plan, rounds, (run, server_round, call), attempt)
    t1 = time.perf_counter()
    try:
        if fault == "exception":
            faults.fail(fault, 0.0)
        reply = CLIENT_APP(msg, context)
        status = DONE
    except Exception as exc:  # noqa: BLE001 - reported to the driver as Flower does
        reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        status = FAILED
    compute = time.perf_counter() - t1
    if fault in faults.CORRUPTING:
        faults.corrupt_reply(reply, fault)
    reply.metadata.__dict__["_message_id"] = f"{msg.metadata.message_id}.reply"
    prefix = f"runs/{run}/rounds/{server_round}/clients/{env.client_id}/{msg.metadata.message_type.replace('.', '-')}"
    out, written = wire.encode(
        reply,
        run=run,
        server_round=server_round,
        store=store,
        prefix=prefix,
        always_store=ALWAYS_STORED,
    )
    if fault in ("tamper", "missing") and out["objects"]:
        damage_object(store, min(out["objects"].values()), fault)
    total = time.perf_counter() - t0
    out["timing"] = {"compute": round(compute, 4), "total": round(total, 4)}
    out["stored_bytes"] = written  # what the reply put on Cloud Storage (the driver counts bytes)
    rounds.end_invocation(
        run,
        server_round,
        call,
        {
            "status": status,
            "message_id": msg.metadata.message_id,
            "reply": json.dumps(out),
            "seconds": {"total": round(total, 4), "compute": round(compute, 4)},
            "bytes_in": len(body),
            "bytes_out": written + len(json.dumps(out)),
            "objects": sorted(out["objects"].values()),
            **({"error": reply.error.reason} if reply.has_error() else {}),
        },
    )
    return 200, out


def inject_call_fault(
    fault: str, plan: faults.FaultPlan, rounds: RoundStore, call: tuple[str, int, str], attempt: int
) -> None:
    """Record an injected fault in the call's invocation document, then act out the ones that
    end the call here: `kill` (the process dies, the document stays "running"), `5xx` (503)
    and `timeout` (hangs, then 504 as Cloud Run answers a request past its time limit)."""
    rounds.note_invocation(*call, f"attempt {attempt}: injected fault '{fault}'")
    if fault == "kill":
        os._exit(70)  # no clean-up, no reply: as an instance dies
    if fault in ("5xx", "timeout"):
        if fault == "timeout":
            time.sleep(plan.hang_seconds)
        status, reason = (
            (503, "injected fault: HTTP 503")
            if fault == "5xx"
            else (504, f"injected fault: timeout after {plan.hang_seconds:g}s")
        )
        rounds.end_invocation(*call, {"status": FAILED, "error": reason})
        raise HttpError(status, reason)


def damage_object(store: GcsArrayStore, name: str, fault: str) -> None:
    """Injected `tamper` (overwrite out of band: bytes no longer match their SHA-256) or
    `missing` (delete) on a reply object, as a hostile or broken storage path would."""
    blob = store.bucket.blob(name)
    if fault == "missing":
        blob.delete()
    else:
        blob.upload_from_string(b"tampered" + blob.download_as_bytes()[8:])


# ---------------------------------------------------------------------------- aggregator


def handle_aggregator(
    body: bytes, content_type: str | None, env: FunctionEnv | None = None
) -> tuple[int, dict]:
    """One fan-out task (FedDF distillation or FedMD transfer learning) of this architecture."""
    t0 = time.perf_counter()
    env = env or FunctionEnv.from_environ("aggregator")
    request = parse_request(body, content_type, env)
    if not isinstance(request, dict):
        raise HttpError(400, "body must be a JSON object")
    for key, kind in (("run", str), ("round", int), ("task", str), ("params", dict)):
        if not isinstance(request.get(key), kind):
            raise HttpError(400, f"field '{key}' missing or not a {kind.__name__}")
    run, server_round, params = request["run"], request["round"], request["params"]
    if params.get("arch") != env.arch:
        raise HttpError(
            400,
            f"task for architecture '{params.get('arch')}', this aggregator serves '{env.arch}'",
        )
    prefix = f"runs/{run}/rounds/{server_round}/aggregators/{env.arch}/"
    if not request["task"].startswith(prefix):
        raise HttpError(403, f"task object must lie under {prefix}")
    store, rounds = _stores(env.bucket, env.database)
    check_run_and_round(rounds, run, server_round)
    try:
        task = taskcodec.decode_task(store.get(request["task"]), params)
    except (ArrayStoreError, ValueError) as exc:
        raise HttpError(400, str(exc)) from exc
    call = f"aggregator:{env.arch}:{request['task'].rsplit('/', 1)[-1].removesuffix('.npz')}"  # one per task
    result_name = prefix + ("student.npz" if params["kind"] == "distill" else "pretrained.npz")
    rounds.begin_invocation(run, server_round, call, request["task"])
    t1 = time.perf_counter()
    outcome = run_distill_task(task) if params["kind"] == "distill" else run_local_train_task(task)
    compute = time.perf_counter() - t1
    state, meta = taskcodec.encode_outcome(outcome)
    try:
        written = store.put(result_name, state) if state else 0
    except AlreadyExists:
        written = 0  # a retried task: the first result stands (create-only), and is the same task's
    total = time.perf_counter() - t0
    rounds.end_invocation(
        run,
        server_round,
        call,
        {
            "status": DONE,
            "seconds": {"total": round(total, 4), "compute": round(compute, 4)},
            "bytes_out": written,
            "objects": [result_name],
        },
    )
    return 200, {
        "result": result_name if state else None,
        "meta": meta,
        "timing": {"compute": round(compute, 4), "total": round(total, 4)},
    }


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


__all__ = ["as_response", "handle_aggregator", "handle_client", "node_id_for"]
