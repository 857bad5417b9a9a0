"""Errors a user can act on. Everything here carries a message meant for a person."""
from __future__ import annotations


class SpecDecError(Exception):
    """Base class: a clear, user-facing problem (bad input, missing model, ...)."""


class InvalidRequestError(SpecDecError, ValueError):
    """A request parameter is out of range or malformed. `field` names the parameter."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelLoadError(SpecDecError):
    """A model or tokenizer could not be found or read."""


class VocabularyMismatchError(SpecDecError):
    """Draft and target do not share a vocabulary, so draft token ids mean nothing to the target."""
