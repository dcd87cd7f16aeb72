"""Typed serving errors, each knowing the HTTP answer it becomes::

    ServingError                500  a generation failed (the model, a device)
    ├── NonFiniteScores         500  one request's next-token scores were NaN or infinite (the others go on)
    ├── AdapterNotFound         404  the adapter reference names nothing live in the registry
    ├── IncompatibleBaseModel   422  the adapter was made for another base model (keys, shapes, targets, name)
    ├── AdapterNotServable      422  a method or file content serving cannot apply per request
    ├── RankTooLarge            422  the adapter's rank exceeds the slots' maximum rank
    ├── RequestTooLarge         422  prompt + max_new_tokens exceed the context or the batch token budget
    ├── QueueFull               429  too many requests waiting (Retry-After)
    ├── NoFreeSlot              503  every adapter slot is pinned to other adapters (Retry-After)
    └── ServingUnavailable      503  serving is disabled, starting or stopping (Retry-After)
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of serving errors: ``status``, ``code``, ``param`` and ``retry_after`` (seconds) for the answer."""

    status = 500
    code = "error"
    retry_after: float | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.param = param
        if retry_after is not None:
            self.retry_after = retry_after


class NonFiniteScores(ServingError):
    """The model's next-token scores for one request were not finite (an overflow in the model or its adapter)."""


class AdapterNotFound(ServingError):
    status, code = 404, "not_found"


class IncompatibleBaseModel(ServingError):
    status, code = 422, "incompatible_base_model"


class AdapterNotServable(ServingError):
    status, code = 422, "invalid_adapter"


class RankTooLarge(ServingError):
    status, code = 422, "rank_too_large"


class RequestTooLarge(ServingError):
    status, code = 422, "invalid_request"


class QueueFull(ServingError):
    status, code, retry_after = 429, "rate_limited", 1.0


class NoFreeSlot(ServingError):
    status, code, retry_after = 503, "unavailable", 5.0


class ServingUnavailable(ServingError):
    status, code, retry_after = 503, "unavailable", 5.0
