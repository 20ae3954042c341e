"""The gateway's errors.

Every error a client can cause maps to exactly one HTTP status and an
OpenAI-shaped body (`{"error": {"message", "type", "param", "code"}}`)::

    GatewayError
    ├── ConfigError                 bad settings, model directory or plugin set-up (startup)
    │   ├── PluginNotFoundError     no plugin registered that name
    │   └── DuplicatePluginError    two plugins registered the same name
    ├── EngineError                 an engine failed a request (500)
    │   └── WorkerLostError         its worker went away mid-request (resumable elsewhere)
    └── ClientError                 the request is at fault or cannot be served now
        ├── InvalidRequestError     400  malformed JSON, wrong types, out-of-range values
        │   └── ContextLengthError  400  prompt (+ max_tokens) exceeds the context window
        ├── AuthenticationError     401  missing or wrong API key
        ├── ModelNotFoundError      404  no worker pool serves that model
        ├── NotFoundError           404  no such route
        ├── MethodNotAllowedError   405
        ├── PayloadTooLargeError    413  body over the configured limit
        ├── OverloadedError         429  admission limit reached (carries Retry-After)
        └── UnavailableError        503  no live worker for the model (carries Retry-After)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Settings, model directory or plugin set-up are wrong; raised at startup."""


class PluginNotFoundError(ConfigError):
    """A component name (engine, router, ...) that no loaded plugin provides."""


class DuplicatePluginError(ConfigError):
    """Two plugins registered the same name in the same family."""


class EngineError(GatewayError):
    """An engine failed while serving a request."""

    status = 500
    type = "server_error"
    code = "engine_error"


class WorkerLostError(EngineError):
    """The worker serving a request died, drained or became unreachable before the
    request finished. The request never completed there, so the frontend may resume
    it on another worker (request migration)."""

    code = "worker_lost"


class KvTransferError(EngineError):
    """Moving KV blocks between workers failed or was refused (unknown or expired
    transfer, layout mismatch, unreachable peer). The decode side falls back to
    computing the prefill itself; the client sees no error."""


class ClientError(GatewayError):
    """An error caused by (or reported to) the client, with its HTTP mapping."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class InvalidRequestError(ClientError):
    status = 400


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFoundError(ClientError):
    status = 404
    code = "model_not_found"


class NotFoundError(ClientError):
    status = 404
    code = "not_found"


class MethodNotAllowedError(ClientError):
    status = 405
    code = "method_not_allowed"


class RequestTimeoutError(ClientError):
    """The client took too long to send its request body (a slow or stalled upload)."""

    status = 408
    code = "request_timeout"


class PayloadTooLargeError(ClientError):
    status = 413
    code = "payload_too_large"


class OverloadedError(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_requests"


class UnavailableError(ClientError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
