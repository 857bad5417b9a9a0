"""A request's output constraint (`response_format`), validated at the door; grammar.py applies it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError

FIELD = "response_format"
KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
MAX_SPEC_CHARS = 100_000  # a schema, regex or grammar's text
MAX_CHOICES = 1000


@dataclass(frozen=True)
class ResponseFormat:
    """A validated constraint. kind: one of KINDS; spec: the schema's JSON text, the regex, the
    Lark grammar, or the choices' JSON list."""
    kind: str
    spec: str = ""

    @staticmethod
    def parse(value: Any) -> "ResponseFormat | None":
        """OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", ...}), or
        one of the extensions {"type": "regex", "regex": ...}, {"type": "grammar", "grammar": LARK},
        {"type": "choice", "choice": [...]}; None or {"type": "text"}: no constraint."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise InvalidRequestError('response_format must be an object with a "type"', FIELD)
        kind = value["type"]
        if kind == "text":
            return None
        if kind not in KINDS:
            raise InvalidRequestError(f"response_format type {kind!r} is not one of text, {', '.join(KINDS)}", FIELD)
        if kind == "json_object":
            return ResponseFormat(kind)
        body = value.get(kind)
        if kind == "json_schema":
            if not isinstance(body, dict) or not isinstance(body.get("schema", {}), dict):
                raise InvalidRequestError('json_schema needs {"name": ..., "schema": {...}}', FIELD)
            spec = json.dumps(body.get("schema", {}))  # OpenAI's: no schema means any JSON object
        elif kind == "choice":
            if (not isinstance(body, list) or not body or len(body) > MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in body)):
                raise InvalidRequestError(f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings", FIELD)
            spec = json.dumps(body)
        else:
            if not isinstance(body, str) or not body:
                raise InvalidRequestError(f'a {kind} response_format needs a non-empty string "{kind}"', FIELD)
            spec = body
        if len(spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(f"the {kind} has more than {MAX_SPEC_CHARS} characters", FIELD)
        return ResponseFormat(kind, spec)
