"""Typed errors of the service and the one table of what each becomes on each protocol.

No framework imports: the engine, the batcher, the data plane and the front ends raise these;
``CODES`` maps each to its HTTP status and its gRPC status code, and each front end turns them
into its own responses in one place (REST: ``{"error": "..."}`` bodies; gRPC: a status and
details). Messages are safe to return to the client verbatim: they never echo tensor payloads
or secrets.
"""

from __future__ import annotations

from typing import NamedTuple

from service.protocol.errors import InvalidInput, PayloadTooLarge

__all__ = [
    "AdminDisabled",
    "ClientDisconnected",
    "Forbidden",
    "InvalidInput",
    "ErrorCodes",
    "ModelLoadFailed",
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
    "mapping",
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


class ErrorCodes(NamedTuple):
    """What an error becomes: its HTTP status, its gRPC status code, and how the request is
    counted (``gated_requests_total{outcome}``, ``gated_rejected_requests_total{reason}``)."""

    http: int
    grpc: str
    outcome: str
    reason: str | None


# The one table. Looked up along the class hierarchy: a subclass maps like its base unless
# listed itself.
CODES: dict[type[Exception], ErrorCodes] = {
    InvalidInput: ErrorCodes(400, "INVALID_ARGUMENT", "invalid", "invalid_input"),
    ModelLoadFailed: ErrorCodes(400, "INVALID_ARGUMENT", "invalid", None),
    ModelNotFound: ErrorCodes(404, "NOT_FOUND", "invalid", "unknown_model"),
    PayloadTooLarge: ErrorCodes(413, "RESOURCE_EXHAUSTED", "invalid", "body_too_large"),
    Unauthorized: ErrorCodes(401, "UNAUTHENTICATED", "invalid", "unauthorized"),
    Forbidden: ErrorCodes(403, "PERMISSION_DENIED", "invalid", "forbidden"),
    QueueFull: ErrorCodes(503, "UNAVAILABLE", "rejected", "queue_full"),
    Unavailable: ErrorCodes(503, "UNAVAILABLE", "rejected", "not_ready"),
    RequestTimeout: ErrorCodes(504, "DEADLINE_EXCEEDED", "timeout", "timeout"),
    ClientDisconnected: ErrorCodes(499, "CANCELLED", "cancelled", "client_disconnected"),
    Unimplemented: ErrorCodes(501, "UNIMPLEMENTED", "invalid", None),
    ServiceError: ErrorCodes(500, "INTERNAL", "error", None),
}


def mapping(err: BaseException) -> ErrorCodes:
    """The table's row of ``err``; anything unknown is an internal error."""
    for kind in type(err).__mro__:
        found = CODES.get(kind)
        if found is not None:
            return found
    return CODES[ServiceError]


def codes(err: BaseException) -> tuple[int, str]:
    """(HTTP status, gRPC status code name) of ``err``."""
    row = mapping(err)
    return row.http, row.grpc
