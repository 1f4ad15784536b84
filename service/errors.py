"""Typed errors of the service; each names the HTTP status it becomes (see ``app.py``).

No framework imports: the engine, the batcher and the routes raise these, and one place
(``register_exception_handlers``) turns them into ``{"error": "..."}`` responses. Messages are
safe to return to the client verbatim: they never echo tensor payloads or secrets.
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
]


class ServiceError(Exception):
    """Base of the errors below; ``status`` is the HTTP status code it maps to."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(ServiceError):
    """Unknown model name or version: 404."""

    status = 404


class ModelLoadFailed(ServiceError):
    """A repository model exists but cannot be loaded (its checkpoint, its factory or its
    network's forward fails); the message names the model and the cause."""

    status = 400


class PayloadTooLarge(ServiceError):
    """Request body over ``max_request_bytes``: 413."""

    status = 413


class Unauthorized(ServiceError):
    """Admin call without a Bearer token: 401."""

    status = 401


class Forbidden(ServiceError):
    """Admin call with a wrong token: 403."""

    status = 403


class AdminDisabled(Forbidden):
    """Admin call while no admin token is configured: 403 with a message saying how to enable."""


class Unavailable(ServiceError):
    """Temporarily unable to serve: 503 with ``Retry-After``."""

    status = 503
    retry_after_s: int = 1


class ServerNotReady(Unavailable):
    """Still loading, or draining after SIGTERM."""


class ModelNotReady(Unavailable):
    """The model exists but is not loaded and warmed up."""


class QueueFull(Unavailable):
    """The model's queue holds ``max_queue_size`` requests already."""


class RequestTimeout(ServiceError):
    """The request's deadline passed before its batch was computed: 504."""

    status = 504


class ClientDisconnected(ServiceError):
    """The client went away before compute; nobody reads the answer (nginx's 499)."""

    status = 499
