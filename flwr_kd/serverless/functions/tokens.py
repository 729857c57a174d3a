"""Who may call a function: Google ID tokens checked inside the function itself
(FLWR_KD_VERIFY_TOKENS=1), on top of Cloud Run's own IAM check in front of it.

Behind Cloud Run's front end (`K_SERVICE` set, as Cloud Run sets it in the container) a token
arrives with its signature replaced by `SIGNATURE_REMOVED_BY_GOOGLE`: the front end verified it,
and only the front end can reach the container, so its claims are checked without the
signature. Without `K_SERVICE` nothing vouches for a token, and an unsigned one is refused.
"""

from __future__ import annotations

import os

from flwr_kd.serverless import idtokens
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.idtokens import service_audiences as function_audiences

__all__ = ["caller_authorization", "function_audiences", "verify_caller"]

#: The header Cloud Run verifies in place of `Authorization` when a caller sends both.
SERVERLESS_AUTHORIZATION = "X-Serverless-Authorization"


def caller_authorization(headers) -> str | None:
    """The header value Cloud Run checked: `X-Serverless-Authorization` when present (Cloud
    Run then passes `Authorization` through unverified), else `Authorization`."""
    return headers.get(SERVERLESS_AUTHORIZATION) or headers.get("Authorization")


def verify_caller(authorization: str | None, audiences: tuple[str, ...] = ()) -> str | None:
    """With FLWR_KD_VERIFY_TOKENS=1, accept only a valid Google ID token of FLWR_KD_INVOKER
    whose audience is this function's URL, and return that e-mail (None with verification
    off).

    Signatures are checked against Google's public certificates, or those at
    FLWR_KD_TOKEN_CERTS_URL (a local token service's, so the emulated stack can test this)."""
    if os.environ.get("FLWR_KD_VERIFY_TOKENS") != "1":
        return None
    try:
        token = idtokens.bearer_token(authorization)
        if os.environ.get("K_SERVICE") and token.endswith("." + idtokens.SIGNATURE_REMOVED):
            claims = idtokens.unsigned_claims(token)
        else:
            certs_url = os.environ.get("FLWR_KD_TOKEN_CERTS_URL") or idtokens.GOOGLE_CERTS_URL
            claims = idtokens.signed_claims(token, idtokens.signing_certs(certs_url))
        idtokens.check_issuer_and_audience(claims, audiences)
    except idtokens.TokenRejected as exc:
        raise HttpError(exc.status, exc.reason) from exc
    invoker = os.environ.get("FLWR_KD_INVOKER", "")
    email = idtokens.verified_email(claims)
    if not invoker or email != invoker:
        raise HttpError(403, "caller is not the driver's service account")
    return email
