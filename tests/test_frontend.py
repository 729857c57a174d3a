"""The emulated Cloud Run front end (`flwr_kd.serverless.frontend`) in front of a real client
function process of `cloud/main.py`, and the function's own check of what the front end
forwards (`verify_caller` with `K_SERVICE`).

Two function processes, started once: `behind` runs as on Cloud Run (`K_SERVICE` set) and
cannot fetch any signing certificate, so it can accept only tokens whose signature the front
end verified and removed; `exposed` has no `K_SERVICE` and checks signatures against the token
service. Every request carries a malformed JSON body: one the function lets through gets its
400 "malformed JSON" error. A busy instance is a function process stopped with SIGSTOP (and
always continued), so no test depends on what a handler does with a valid message.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
import requests

pytest.register_assert_rewrite("serverless_fixtures")  # it is also a plugin (below)
from serverless_fixtures import CLOUD_MAIN, ensure_bucket, function_env, start_all, wait_for

from flwr_kd.serverless.emulators import FunctionProcess, free_port
from flwr_kd.serverless.frontend import MAX_REQUEST_BYTES, FrontEnd, ServiceSettings
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.functions.tokens import verify_caller
from flwr_kd.serverless.grid import CloudFunctionGrid, GridOptions
from flwr_kd.serverless.idtokens import SIGNATURE_REMOVED, strip_signature
from flwr_kd.serverless.tokenservice import TokenService, rsa_signer

pytest_plugins = ["serverless_fixtures"]

BUCKET = "kd-tests-frontend"
DRIVER = "flwr-kd-driver@demo-flwr-kd-tests.iam.gserviceaccount.com"
CLIENT_SA = "flwr-kd-c-client-1@demo-flwr-kd-tests.iam.gserviceaccount.com"
MALFORMED_BODY = b"{not json"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tokens():
    with TokenService() as service:
        yield service


@dataclass
class Functions:
    behind: FunctionProcess  # K_SERVICE set; no reachable certificates
    exposed: FunctionProcess  # no K_SERVICE; the token service's certificates


@pytest.fixture(scope="module")
def functions(cloud_env, tokens, tmp_path_factory):
    ensure_bucket(BUCKET)
    log_dir = tmp_path_factory.mktemp("frontend-logs")

    def env(**extra):
        return function_env(
            BUCKET,
            FLWR_KD_CLIENT_ID="client-0",
            FLWR_KD_ARCH="resnet10t",
            FLWR_KD_DATA_PREFIX="clients/client-0/data/",
            FLWR_KD_VERIFY_TOKENS="1",
            FLWR_KD_INVOKER=DRIVER,
            **extra,
        )

    nowhere = f"http://127.0.0.1:{free_port()}/oauth2/v1/certs"  # nothing listens there
    envs = {
        "behind": env(K_SERVICE="client-0", FLWR_KD_TOKEN_CERTS_URL=nowhere),
        "exposed": env(FLWR_KD_TOKEN_CERTS_URL=tokens.certs_url),
    }
    behind, exposed = start_all(
        [(FunctionProcess, CLOUD_MAIN, "client", e, name, log_dir) for name, e in envs.items()]
    )
    try:
        yield Functions(behind, exposed)
    finally:
        behind.stop()
        exposed.stop()


@pytest.fixture
def front_end(functions, tokens):
    """`front_end(**settings)`: a front end for `behind` that only the driver may invoke
    (Cloud Run's limits unless `settings` say otherwise), stopped after the test."""
    with ExitStack() as stack:

        def start(**settings) -> FrontEnd:
            service = ServiceSettings(invokers=frozenset({DRIVER}), **settings)
            front = FrontEnd("client-0", functions.behind.url, service, tokens.certs_url)
            return stack.enter_context(front)

        yield start


def post(url: str, token: str | None = None, data: bytes = MALFORMED_BODY, **kwargs):
    headers = {**JSON, **({"Authorization": f"Bearer {token}"} if token else {})}
    return requests.post(url, data=data, headers=headers, timeout=60, **kwargs)


def passed_to_the_function(resp: requests.Response) -> bool:
    """The function answered: its JSON error for the malformed body."""
    return resp.status_code == 400 and resp.json()["error"].startswith("malformed JSON")


def refused(resp: requests.Response, status: int, front: FrontEnd) -> str:
    """The front end itself answered `status` (Google's HTML page); its logged reason."""
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("text/html")
    assert front.log[-1].status == status
    return front.log[-1].reason


@contextmanager
def stopped(fn: FunctionProcess):
    """The function's instance frozen (busy, from the front end's side) until the block ends."""
    os.killpg(fn.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(fn.proc.pid, signal.SIGCONT)


# ------------------------------------------------------------------------ authentication


def test_no_token_gets_401(front_end):
    front = front_end()
    reason = refused(post(front.url), 401, front)
    assert "not authenticated" in reason and "Authorization: Bearer" in reason


def test_token_for_the_wrong_audience_gets_401(front_end, tokens):
    front = front_end()
    for audience in ("https://client-1-abc-ew.a.run.app", f"{front.url}/other"):
        token = tokens.token(audience, email=DRIVER)
        assert "audience" in refused(post(front.url, token), 401, front)


def test_token_signed_by_another_key_gets_401(front_end, tokens):
    front = front_end()
    other, _ = rsa_signer()
    token = tokens.token(front.url, email=DRIVER, signer=other)
    assert "invalid ID token" in refused(post(front.url, token), 401, front)


def test_token_of_another_service_account_gets_403(front_end, tokens):
    front = front_end()
    token = tokens.token(front.url, email=CLIENT_SA)
    reason = refused(post(front.url, token), 403, front)
    assert CLIENT_SA in reason and "roles/run.invoker" in reason
    unverified = tokens.token(front.url, email=DRIVER, email_verified=False)
    refused(post(front.url, unverified), 403, front)


def test_the_driver_gets_through_and_the_function_sees_the_signature_removed(front_end, tokens):
    """`behind` cannot fetch a certificate: it accepts the call only because what reached it
    was the front end's `<header>.<payload>.SIGNATURE_REMOVED_BY_GOOGLE`."""
    front = front_end()
    for audience in (front.url, front.url.replace("http://", "https://")):
        resp = post(front.url, tokens.token(audience, email=DRIVER))
        assert passed_to_the_function(resp), resp.text
        assert (front.log[-1].status, front.log[-1].caller) == (400, DRIVER)


def test_x_serverless_authorization_is_the_header_checked_when_present(front_end, tokens):
    """Cloud Run checks `X-Serverless-Authorization` first and passes `Authorization` on as
    sent; the function then believes the header the front end checked, not the other."""
    front = front_end()
    driver, other = (tokens.token(front.url, email=e) for e in (DRIVER, CLIENT_SA))
    headers = {**JSON, "X-Serverless-Authorization": f"Bearer {driver}"}
    resp = requests.post(front.url, data=MALFORMED_BODY, timeout=60, headers=headers)
    assert passed_to_the_function(resp)
    headers["authorization"] = "Bearer not.a.token"  # any case
    resp = requests.post(front.url, data=MALFORMED_BODY, timeout=60, headers=headers)
    assert passed_to_the_function(resp)
    headers = {**JSON, "X-Serverless-Authorization": f"Bearer {other}"}
    headers["Authorization"] = f"Bearer {driver}"
    resp = requests.post(front.url, data=MALFORMED_BODY, timeout=60, headers=headers)
    refused(resp, 403, front)


def test_unsigned_token_is_refused_by_a_function_no_front_end_vouches_for(functions, tokens):
    unsigned = strip_signature(tokens.token(functions.exposed.url, email=DRIVER))
    assert unsigned.endswith("." + SIGNATURE_REMOVED)
    resp = post(functions.exposed.url, unsigned)
    assert resp.status_code == 401 and resp.json()["error"].startswith("invalid ID token")
    signed = tokens.token(functions.exposed.url, email=DRIVER)
    assert passed_to_the_function(post(functions.exposed.url, signed))


# ----------------------------------------------------------------------------------- limits


def test_request_over_the_size_limit_gets_413(front_end, tokens):
    front = front_end()
    token = tokens.token(front.url, email=DRIVER)
    resp = post(front.url, token, data=b" " * (MAX_REQUEST_BYTES + 1))
    assert "over the limit" in refused(resp, 413, front)
    assert passed_to_the_function(post(front.url, token))  # and it still serves


def test_second_call_to_a_busy_one_instance_function_gets_429_and_the_grid_retries(
    front_end, functions, tokens
):
    front = front_end(pending_seconds=0.5)
    auth = tokens.auth(DRIVER)
    grid = CloudFunctionGrid([], store=None, run_id="frontend", options=GridOptions(backoff=0.2))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            with stopped(functions.behind):
                first = pool.submit(post, front.url, tokens.token(front.url, email=DRIVER))
                wait_for(lambda: front.busy == 1, 30, "the first call to reach the instance")
                second = pool.submit(
                    grid.session.post,
                    front.url,
                    data=MALFORMED_BODY,
                    headers={**JSON, **auth(front.url)},
                    timeout=60,
                )
                wait_for(lambda: any(r.status == 429 for r in front.log), 30, "a 429")
            assert passed_to_the_function(first.result())
            assert passed_to_the_function(second.result())  # the grid's retry got through
    finally:
        grid.close()
    statuses = [r.status for r in front.log]
    assert statuses[0] == 429 and statuses.count(400) == 2, statuses
    assert "no available instance" in front.log[0].reason


def test_no_answer_within_the_timeout_gets_504(front_end, functions, tokens):
    front = front_end(timeout_seconds=1)
    token = tokens.token(front.url, email=DRIVER)
    with stopped(functions.behind):
        t0 = time.monotonic()
        resp = post(front.url, token)
        assert "maximum request timeout" in refused(resp, 504, front)
        assert time.monotonic() - t0 < 10
    assert front.busy == 0  # the timed-out request no longer holds the instance


# ------------------------------------------------- the function's check of what is forwarded


@pytest.fixture
def behind_cloud_run(monkeypatch):
    """`verify_caller`'s environment in a function behind Cloud Run's front end."""
    monkeypatch.setenv("FLWR_KD_VERIFY_TOKENS", "1")
    monkeypatch.setenv("FLWR_KD_INVOKER", DRIVER)
    monkeypatch.setenv("K_SERVICE", "client-0")
    monkeypatch.setenv("FLWR_KD_TOKEN_CERTS_URL", f"http://127.0.0.1:{free_port()}/certs")


AUDIENCE = "https://client-0-abc-ew.a.run.app"


def test_function_behind_cloud_run_checks_the_claims_of_a_stripped_token(behind_cloud_run, tokens):
    def check(**claims):
        token = strip_signature(tokens.token(AUDIENCE, **{"email": DRIVER, **claims}))
        return verify_caller(f"Bearer {token}", (AUDIENCE,))

    assert check() == DRIVER
    now = int(time.time())
    for claims, status, words in [
        ({"iat": now - 7200, "exp": now - 3600}, 401, "expired"),
        ({"iat": now + 3600, "exp": now + 7200}, 401, "too early"),
        ({"aud": "https://client-1-abc-ew.a.run.app"}, 401, "audience"),
        ({"iss": "https://evil.example.com"}, 401, "not Google"),
        ({"email": CLIENT_SA}, 403, "driver's service account"),
        ({"email_verified": False}, 403, "driver's service account"),
    ]:
        with pytest.raises(HttpError) as info:
            check(**claims)
        assert info.value.status == status and words in info.value.message, claims


def test_function_behind_cloud_run_still_checks_a_signature_it_is_given(behind_cloud_run, tokens):
    """A token that still carries a signature is verified as such: here the certificates are
    unreachable, so it is refused (503), never believed on its claims."""
    with pytest.raises(HttpError) as info:
        verify_caller(f"Bearer {tokens.token(AUDIENCE, email=DRIVER)}", (AUDIENCE,))
    assert info.value.status == 503
