"""Errors raised while reading or writing the V2 wire format.

Kept free of framework imports so the codec can raise them anywhere; the HTTP
layer maps them to status codes in one place.
"""


class InvalidInput(Exception):
    """The request (or the output format it asked for) cannot be honoured; maps to HTTP 400.

    `message` is safe to return to the client verbatim: it names the offending
    field and what was expected, and never echoes tensor payloads.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
