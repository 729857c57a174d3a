"""The one way a function module says "answer with this status": `as_response` turns it into
`{"error": message}`, so no check needs to know about the web framework."""

from __future__ import annotations


class HttpError(Exception):
    """A non-200 answer; `message` is what the caller reads (never a credential)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message
