"""Google ID tokens: what one says and whether to believe it.

Shared by the two places that check a caller: the function's own check
(`functions.tokens.verify_caller`) and the emulated Cloud Run front end (`frontend`), so both
read a token the same way. Errors never repeat the token (it is a credential until it expires).
"""

from __future__ import annotations

import time

#: Where Google publishes the keys that sign its ID tokens.
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
#: The issuer Google writes into its ID tokens (the bare host name is also seen).
GOOGLE_ISSUER = "https://accounts.google.com"
GOOGLE_ISSUERS = ("accounts.google.com", GOOGLE_ISSUER)
#: What Cloud Run puts in place of a verified token's signature before the request reaches the
#: container (Cloud Run troubleshooting, "signature removed").
SIGNATURE_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"
#: Seconds the signing certificates are kept before they are fetched again (Google rotates its
#: keys over days; its certificates endpoint says max-age of a few hours).
CERTS_TTL_SECONDS = 300
_certs_cache: dict[str, tuple[float, dict]] = {}


class TokenRejected(Exception):
    """The caller's token does not let it in: `status` (401, or 503 when the certificates
    cannot be fetched) and a `reason` that never contains the token."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


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
        raise TokenRejected(
            503, f"cannot fetch the ID-token signing certificates: {type(exc).__name__}"
        ) from exc
    _certs_cache[url] = (time.monotonic(), certs)
    return certs


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header value; 401 without one."""
    if not authorization or not authorization.startswith("Bearer "):
        raise TokenRejected(401, "missing 'Authorization: Bearer <Google ID token>' header")
    return authorization[len("Bearer ") :].strip()


def signed_claims(token: str, certs: dict) -> dict:
    """The claims of `token` once its signature (against `certs`), issue and expiry times hold;
    401 otherwise."""
    import google.auth.exceptions
    import google.auth.jwt

    try:
        return google.auth.jwt.decode(token, certs=certs)
    except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
        raise TokenRejected(401, f"invalid ID token: {_redacted(str(exc), token)[:200]}") from exc


def unsigned_claims(token: str) -> dict:
    """The claims of a token whose signature Cloud Run's front end verified and then removed
    (`<header>.<payload>.SIGNATURE_REMOVED_BY_GOOGLE`), once its issue and expiry times hold;
    401 otherwise. Only code that nothing but the front end can reach may believe them."""
    import google.auth.exceptions
    import google.auth.jwt

    if token.count(".") != 2 or not token.endswith("." + SIGNATURE_REMOVED):
        raise TokenRejected(401, "invalid ID token: its signature was not removed by Cloud Run")
    try:
        claims = google.auth.jwt.decode(token, verify=False)
    except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
        raise TokenRejected(401, f"invalid ID token: {_redacted(str(exc), token)[:200]}") from exc
    now = time.time()
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, (int, float)) or not isinstance(exp, (int, float)):
        raise TokenRejected(401, "invalid ID token: it lacks the iat or exp claim")
    if now < iat:
        raise TokenRejected(401, "invalid ID token: Token used too early")
    if exp < now:
        raise TokenRejected(401, "invalid ID token: Token expired")
    return claims


def check_issuer_and_audience(claims: dict, audiences: tuple[str, ...]) -> None:
    """401 unless Google issued the token for one of `audiences`."""
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise TokenRejected(401, f"ID token issued by {claims.get('iss')!r}, not Google")
    if claims.get("aud") not in audiences:
        raise TokenRejected(401, f"ID token for audience {claims.get('aud')!r}, not this function")


def verified_email(claims: dict) -> str | None:
    """The caller's e-mail when Google verified it, else None."""
    email = claims.get("email")
    return email if isinstance(email, str) and claims.get("email_verified") is True else None


def strip_signature(token: str) -> str:
    """`token` as Cloud Run forwards it once verified: the signature replaced."""
    return token.rsplit(".", 1)[0] + "." + SIGNATURE_REMOVED


def service_audiences(base_url: str, url_root: str) -> tuple[str, ...]:
    """The URLs a token for this service may name. Cloud Run ends TLS in front of the
    container, which therefore sees `http://`; the driver asks for `https://` tokens. (Cloud
    Run routes by host name, so the Host header is this service's own.)"""
    urls = {u.rstrip("/") for u in (base_url, url_root)}
    return tuple(
        sorted(urls | {"https://" + u.split("://", 1)[1] for u in urls if u.startswith("http://")})
    )


def _redacted(reason: str, token: str) -> str:
    for part in [token, *token.split(".")]:
        if part:
            reason = reason.replace(part, "<redacted>")
    return reason
