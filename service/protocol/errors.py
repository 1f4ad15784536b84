"""Errors raised while reading or writing the V2 wire format.

Kept free of framework imports so the codec can raise them anywhere; the HTTP
layer maps them to status codes in one place.
"""


def shown(text: str, limit: int = 64) -> str:
    """``text`` as an error message may quote it: repr'd, and cut at ``limit`` characters (a
    client's names can be megabytes long, and gRPC carries messages in a header)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


class InvalidInput(Exception):
    """The request (or the output format it asked for) cannot be honoured; maps to HTTP 400.

    `message` is safe to return to the client verbatim: it names the offending
    field and what was expected, and never echoes tensor payloads.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PayloadTooLarge(InvalidInput):
    """The request is larger than the server takes (bytes, or values of its JSON); maps to 413."""
