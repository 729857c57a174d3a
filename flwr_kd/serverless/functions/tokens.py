"""Who may call a function: Google ID tokens checked inside the function itself
(FLWR_KD_VERIFY_TOKENS=1), on top of Cloud Run's own IAM check in front of it."""

from __future__ import annotations

import os
import time

from flwr_kd.serverless.functions.errors import HttpError

#: Where Google publishes the keys that sign its ID tokens.
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
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
