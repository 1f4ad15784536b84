"""Typed errors of the service and the one table of what each becomes on each protocol.

No framework imports: the engine, the batcher, the data plane and the front ends raise these;
``CODES`` maps each to its HTTP status and its gRPC status code, and each front end turns them
into its own responses in one place (REST: ``{"error": "..."}`` bodies; gRPC: a status and
details). Messages are safe to return to the client verbatim: they never echo tensor payloads
or secrets.
"""

from __future__ import annotations

from service.protocol.errors import InvalidInput

__all__ = [
    "AdminDisabled",
    "ClientDisconnected",
    "Forbidden",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "PayloadTooLarge",
    "QueueFull",
    "RequestTimeout",
    "ServerNotReady",
    "ServiceError",
    "Unauthorized",
    "Unavailable",
    "Unimplemented",
    "codes",
]


class ServiceError(Exception):
    """Base of the errors below (500 / INTERNAL unless a subclass says otherwise)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(ServiceError):
    """Unknown model name or version: 404."""



class ModelLoadFailed(ServiceError):
    """A repository model exists but cannot be loaded (its checkpoint, its factory or its
    network's forward fails); the message names the model and the cause."""



class PayloadTooLarge(ServiceError):
    """Request body over ``max_request_bytes``: 413."""



class Unauthorized(ServiceError):
    """Admin call without a Bearer token: 401."""



class Forbidden(ServiceError):
    """Admin call with a wrong token: 403."""



class AdminDisabled(Forbidden):
    """Admin call while no admin token is configured: 403 with a message saying how to enable."""


class Unavailable(ServiceError):
    """Temporarily unable to serve: 503 with ``Retry-After``."""

    retry_after_s: int = 1


class ServerNotReady(Unavailable):
    """Still loading, or draining after SIGTERM."""


class ModelNotReady(Unavailable):
    """The model exists but is not loaded and warmed up."""


class QueueFull(Unavailable):
    """The model's queue holds ``max_queue_size`` requests already."""


class RequestTimeout(ServiceError):
    """The request's deadline passed before its batch was computed: 504."""



class ClientDisconnected(ServiceError):
    """The client went away before compute; nobody reads the answer (nginx's 499)."""



class Unimplemented(ServiceError):
    """A protocol feature this server does not offer (shared memory, statistics...); the
    message names it."""


# What each error becomes: (HTTP status, gRPC status code name). Looked up along the class
# hierarchy, so a subclass maps like its base unless listed itself.
CODES: dict[type[Exception], tuple[int, str]] = {
    InvalidInput: (400, "INVALID_ARGUMENT"),
    ModelLoadFailed: (400, "INVALID_ARGUMENT"),
    ModelNotFound: (404, "NOT_FOUND"),
    PayloadTooLarge: (413, "RESOURCE_EXHAUSTED"),
    Unauthorized: (401, "UNAUTHENTICATED"),
    Forbidden: (403, "PERMISSION_DENIED"),
    Unavailable: (503, "UNAVAILABLE"),
    RequestTimeout: (504, "DEADLINE_EXCEEDED"),
    ClientDisconnected: (499, "CANCELLED"),
    Unimplemented: (501, "UNIMPLEMENTED"),
    ServiceError: (500, "INTERNAL"),
}


def codes(err: Exception) -> tuple[int, str]:
    """(HTTP status, gRPC status code name) of ``err``; anything unknown is an internal error."""
    for kind in type(err).__mro__:
        found = CODES.get(kind)
        if found is not None:
            return found
    return CODES[ServiceError]
