"""A local stand-in for Google's token service, so the emulated stack authenticates as the
deployed one does.

It holds an RSA key with a self-signed certificate, serves its certificates as Google serves
its own (`{"<key id>": "<PEM>"}` at https://www.googleapis.com/oauth2/v1/certs) on a
127.0.0.1 port it picks, and mints Google-style ID tokens for a service account's e-mail
(claims `iss`, `aud`, `azp`, `sub`, `email`, `email_verified`, `iat`, `exp`), signed with
google-auth's own `RSASigner` and `jwt.encode`. `auth(email)` is what the driver's grid sends
with every call (`GridOptions.auth`), as `google_id_token_auth` does against Google.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import json
import threading
import time
from collections.abc import Callable
from typing import Self

from flwr_kd.serverless.idtokens import GOOGLE_ISSUER
from flwr_kd.serverless.localserver import LocalServer

#: The key id of the served certificate (Google's are hex digests; any string works).
KEY_ID = "flwr-kd-emulated-key"
#: Seconds a minted token is valid, as Google's ID tokens (one hour).
TOKEN_LIFETIME_SECONDS = 3600


def rsa_signer(key_id: str = KEY_ID):
    """(google-auth `RSASigner`, its certificate's PEM) for a new 2048-bit RSA key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    from google.auth import crypt

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-kd emulated token service")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = crypt.RSASigner.from_string(pem, key_id=key_id)
    return signer, cert.public_bytes(serialization.Encoding.PEM).decode()


def subject_of(email: str) -> str:
    """A stable 21-digit `sub` for a service account (Google uses its unique numeric id)."""
    return str(int(hashlib.sha256(email.encode()).hexdigest(), 16))[:21]


class TokenService:
    """The token service for one emulated deployment; a context manager serving its
    certificates while open. `fetches` lists the paths of certificate requests it answered."""

    def __init__(self) -> None:
        self.signer, cert = rsa_signer(KEY_ID)
        self.certs = {KEY_ID: cert}
        self.fetches: list[str] = []
        self._listener: LocalServer | None = None

    @property
    def certs_url(self) -> str:
        assert self._listener is not None, "the token service is not started"
        return f"{self._listener.url}/oauth2/v1/certs"

    def __enter__(self) -> Self:
        self._listener = LocalServer(self._handler_class(), "token-service")
        return self

    def __exit__(self, *exc) -> None:
        if self._listener is not None:
            self._listener.stop()

    def token(self, audience: str | None, *, signer=None, **claims) -> str:
        """A signed ID token for `audience`; `claims` (e.g. `email`) add to, override, or with
        None drop the defaults. `signer`: sign with another key (one that is not served)."""
        now = int(time.time())
        email = claims.get("email")
        payload = {
            "iss": GOOGLE_ISSUER,
            "aud": audience,
            "azp": subject_of(email) if email else None,
            "sub": subject_of(email) if email else None,
            "email_verified": True if email else None,
            "iat": now - 10,
            "exp": now + TOKEN_LIFETIME_SECONDS,
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        from google.auth import jwt

        return jwt.encode(signer or self.signer, payload).decode()

    def auth(self, email: str) -> Callable[[str], dict]:
        """Authorization headers with an ID token of `email` for each URL (cached per URL while
        it has more than a quarter of its life left), for `GridOptions.auth`."""
        cache: dict[str, tuple[str, float]] = {}
        lock = threading.Lock()

        def headers(audience: str) -> dict:
            with lock:
                token, renew_at = cache.get(audience, ("", 0.0))
                if time.time() >= renew_at:
                    token = self.token(audience, email=email)
                    cache[audience] = (token, time.time() + 0.75 * TOKEN_LIFETIME_SECONDS)
            return {"Authorization": f"Bearer {token}"}

        return headers

    def _handler_class(self):
        service = self

        class CertsHandler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                service.fetches.append(self.path)
                body = json.dumps(service.certs).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Cache-Control", "public, max-age=19800")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):
                pass

        return CertsHandler
