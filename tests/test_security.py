"""ID-token verification at the Cloud Function boundary (`verify_caller`, `as_response`).

A real client function process of `cloud/main.py` runs with `FLWR_KD_VERIFY_TOKENS=1`; its
`FLWR_KD_TOKEN_CERTS_URL` names the local token service (`flwr_kd.serverless.tokenservice`): an
RSA key with a self-signed certificate, served as Google serves its certificates
(`{"<kid>": "<PEM>"}`) by an HTTP server on 127.0.0.1. Tokens are signed with google-auth's own
`RSASigner` and `jwt.encode`.

Every request carries a malformed JSON body: one that passes authentication gets the 400
"malformed JSON" error (so the check demonstrably let it through), and nothing is written.
"""

from __future__ import annotations

import base64
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

pytest.register_assert_rewrite("serverless_fixtures")  # it is also a plugin (below)
from serverless_fixtures import CLOUD_MAIN, ensure_bucket, function_env, list_objects, started

from flwr_kd.serverless.emulators import FunctionProcess
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.functions.tokens import verify_caller
from flwr_kd.serverless.tokenservice import KEY_ID, TokenService, rsa_signer

# the fixtures (emulators, cloud_env)
pytest_plugins = ["serverless_fixtures"]

BUCKET = "kd-tests-security"
INVOKER = "driver@demo.iam.gserviceaccount.com"
MALFORMED_BODY = b"{not json"
JSON = {"Content-Type": "application/json"}


# ---------------------------------------------------------------------------------- signer


class DriverTokens(TokenService):
    """The token service, minting tokens of the driver (`INVOKER`) unless told otherwise;
    `other` signs with a key it does not serve (under the same key id, so only the signature
    check can reject it)."""

    def __init__(self) -> None:
        super().__init__()
        self.other, _ = rsa_signer(KEY_ID)

    def token(self, audience, *, signer=None, **claims) -> str:
        return super().token(audience, signer=signer, **{"email": INVOKER, **claims})


@pytest.fixture(scope="module")
def signer():
    """The token service, its certificates served as JSON on a free port of 127.0.0.1 for the
    module."""
    with DriverTokens() as service:
        yield service


# -------------------------------------------------------------------------------- function


@dataclass
class SecureFunction:
    fn: FunctionProcess
    log_path: object

    @property
    def url(self) -> str:
        return self.fn.url

    def post(self, authorization: str | None = None, **headers) -> requests.Response:
        if authorization is not None:
            headers["Authorization"] = authorization
        return requests.post(self.url, data=MALFORMED_BODY, headers={**JSON, **headers}, timeout=30)


@pytest.fixture(scope="module")
def secure_client(cloud_env, signer, tmp_path_factory):
    """Client function `client-0` verifying ID tokens against the local signer."""
    ensure_bucket(BUCKET)
    log_dir = tmp_path_factory.mktemp("security-logs")
    env = function_env(
        BUCKET,
        FLWR_KD_CLIENT_ID="client-0",
        FLWR_KD_ARCH="resnet10t",
        FLWR_KD_DATA_PREFIX="clients/client-0/data/",
        FLWR_KD_VERIFY_TOKENS="1",
        FLWR_KD_INVOKER=INVOKER,
        FLWR_KD_TOKEN_CERTS_URL=signer.certs_url,
    )
    fn = started(FunctionProcess, CLOUD_MAIN, "client", env, "client-secure", log_dir)
    try:
        yield SecureFunction(fn, log_dir / "client-secure.log")
    finally:
        fn.stop()


def error_of(resp: requests.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    return resp.json()["error"]


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("authorization", [None, "", "Basic ZHJpdmVyOnNlY3JldA==", "abc.def.ghi"])
def test_missing_bearer_header_is_401(secure_client, authorization):
    error = error_of(secure_client.post(authorization), 401)
    assert "Authorization: Bearer" in error and "missing" in error


def test_get_without_token_is_401(secure_client):
    resp = requests.get(secure_client.url, timeout=30)
    assert "Authorization: Bearer" in error_of(resp, 401)


def test_token_signed_by_another_key_is_401(secure_client, signer):
    token = signer.token(secure_client.url, signer=signer.other)
    error = error_of(secure_client.post(f"Bearer {token}"), 401)
    assert error.startswith("invalid ID token")
    assert "signature" in error


def test_token_of_unknown_key_id_is_401(secure_client, signer):
    stranger, _ = rsa_signer("someone-else")
    token = signer.token(secure_client.url, signer=stranger)
    error = error_of(secure_client.post(f"Bearer {token}"), 401)
    assert error.startswith("invalid ID token")


def test_expired_token_is_401(secure_client, signer):
    now = int(time.time())
    token = signer.token(secure_client.url, iat=now - 7200, exp=now - 3600)
    error = error_of(secure_client.post(f"Bearer {token}"), 401)
    assert error.startswith("invalid ID token")
    assert "expired" in error.lower()


def test_token_issued_in_the_future_is_401(secure_client, signer):
    now = int(time.time())
    token = signer.token(secure_client.url, iat=now + 3600, exp=now + 7200)
    error = error_of(secure_client.post(f"Bearer {token}"), 401)
    assert error.startswith("invalid ID token")
    assert "too early" in error


@pytest.mark.parametrize(
    "audience", ["http://127.0.0.1:1", "https://other-function.a.run.app", "{url}/other"]
)
def test_wrong_audience_is_401(secure_client, signer, audience):
    audience = audience.format(url=secure_client.url)
    token = signer.token(audience)
    error = error_of(secure_client.post(f"Bearer {token}"), 401)
    assert "audience" in error and repr(audience) in error


def test_token_without_audience_is_401(secure_client, signer):
    error = error_of(secure_client.post(f"Bearer {signer.token(None)}"), 401)
    assert "audience None" in error


@pytest.mark.parametrize(
    "issuer", ["https://evil.example.com", "accounts.google.com.evil.example", None]
)
def test_wrong_issuer_is_401(secure_client, signer, issuer):
    token = signer.token(secure_client.url, iss=issuer)
    error = error_of(secure_client.post(f"Bearer {token}"), 401)
    assert "issued by" in error and repr(issuer) in error and "not Google" in error


@pytest.mark.parametrize(
    "claims",
    [
        {"email": "intruder@demo.iam.gserviceaccount.com"},
        {"email": None},
        {"email_verified": False},
        {"email_verified": None},
    ],
    ids=["other-email", "no-email", "email-unverified", "no-email-verified"],
)
def test_other_caller_is_403(secure_client, signer, claims):
    token = signer.token(secure_client.url, **claims)
    error = error_of(secure_client.post(f"Bearer {token}"), 403)
    assert "driver's service account" in error


@pytest.mark.parametrize("issuer", ["https://accounts.google.com", "accounts.google.com"])
def test_valid_driver_token_passes_authentication(secure_client, signer, issuer):
    token = signer.token(secure_client.url, iss=issuer)
    error = error_of(secure_client.post(f"Bearer {token}"), 400)
    assert error.startswith("malformed JSON")  # the handler ran: authentication let it through
    assert signer.fetches  # verified against the local signer's certificates (cached)
    assert list_objects(BUCKET) == []  # and the bad body wrote nothing


# ------------------------------------------------------------------ no secrets in errors/logs


def bad_tokens(signer: DriverTokens, audience: str) -> dict[str, str]:
    """Tokens the check must reject, each carrying a signature worth keeping secret."""
    valid = signer.token(audience)
    header, payload, signature = valid.split(".")
    now = int(time.time())
    return {
        "other-key": signer.token(audience, signer=signer.other),
        "expired": signer.token(audience, iat=now - 7200, exp=now - 3600),
        "wrong-audience": signer.token("http://127.0.0.1:1"),
        "extra-segment": f"{valid}.{signature}",
        "missing-segment": f"{header}.{signature}",
        "header-not-json": (
            f"{base64.urlsafe_b64encode(b'not json').decode()}.{payload}.{signature}"
        ),
    }


def assert_not_echoed(token: str, text: str, where: str) -> None:
    """Neither the token nor its signature (what makes it a bearer credential) is in `text`."""
    leaked = [
        name
        for name, part in (("token", token), ("signature", token.split(".")[-1]))
        if part in text
    ]
    assert not leaked, (
        f"{where} echoes the bearer token's {' and '.join(leaked)}: {text[:120]!r}..."
    )


BAD_TOKEN_KINDS = [
    "other-key",
    "expired",
    "wrong-audience",
    "extra-segment",
    "missing-segment",
    "header-not-json",
]


@pytest.fixture
def verify_env(monkeypatch, signer):
    """`verify_caller`'s environment in this process, as in the function's."""
    monkeypatch.setenv("FLWR_KD_VERIFY_TOKENS", "1")
    monkeypatch.setenv("FLWR_KD_INVOKER", INVOKER)
    monkeypatch.setenv("FLWR_KD_TOKEN_CERTS_URL", signer.certs_url)


def test_verify_caller_in_process(verify_env, signer):
    audience = "https://client-0.a.run.app"
    verify_caller(f"Bearer {signer.token(audience)}", (audience,))  # accepted: no exception
    with pytest.raises(HttpError) as info:
        verify_caller(f"Bearer {signer.token(audience)}", ())
    assert info.value.status == 401 and "audience" in info.value.message


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
def test_bad_token_error_does_not_echo_it(verify_env, signer, kind):
    audience = "https://client-0.a.run.app"
    token = bad_tokens(signer, audience)[kind]
    with pytest.raises(HttpError) as info:
        verify_caller(f"Bearer {token}", (audience,))
    assert info.value.status == 401
    assert_not_echoed(token, info.value.message, "the error")


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
def test_bad_token_not_in_response_or_log(secure_client, signer, kind):
    token = bad_tokens(signer, secure_client.url)[kind]
    resp = secure_client.post(f"Bearer {token}")
    error_of(resp, 401)
    assert_not_echoed(token, resp.text, "the response")
    log = (
        secure_client.log_path.read_text(errors="replace")
        if secure_client.log_path.exists()
        else ""
    )
    assert_not_echoed(token, log, "the function's log")


def test_token_for_the_https_url_passes_behind_cloud_runs_tls(secure_client, signer):
    """Cloud Run ends TLS in front of the container, which sees http://; the driver asks for
    tokens naming the function's https:// URL."""
    https_url = "https://" + secure_client.url.split("://", 1)[1]
    error = error_of(secure_client.post(f"Bearer {signer.token(https_url)}"), 400)
    assert error.startswith("malformed JSON")


# ------------------------------------------------------------------ no secrets in the repository

SECRET_PATTERNS = {
    "a private key": re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "a service-account key file": re.compile(r'"private_key_id"\s*:\s*"[0-9a-f]{20,}"'),
    "a Google API key": re.compile(r"AIza[0-9A-Za-z_\-]{35}"),
    "an OAuth access token": re.compile(r"ya29\.[0-9A-Za-z_\-]{20,}"),
}


def test_no_secret_is_committed():
    """Functions authenticate as their runtime service account and the driver with Application
    Default Credentials: nothing the repository tracks may hold a key or token."""
    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.split(b"\0")
    files = [root / name.decode() for name in tracked if name]
    assert len(files) > 50, "git ls-files found too little: is this a checkout?"
    found = []
    for path in files:
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        found += [
            f"{path.relative_to(root)}: {what}"
            for what, pattern in SECRET_PATTERNS.items()
            if pattern.search(text)
        ]
    assert not found, found


def test_the_secret_scan_would_find_a_key():
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(  # as a key file holds it
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    assert SECRET_PATTERNS["a private key"].search(key)
