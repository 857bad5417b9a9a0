"""The OpenAI wire format: request models (validated) and response / chunk builders."""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidRequestError
from ..generation import GenerationOutput
from ..token_logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from ..stats import GenerationStats

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the completions endpoint


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = None


class _Sampling(BaseModel):
    # Unknown fields are refused by name (400), not ignored: a client must not believe a
    # setting took effect when it did not.
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    num_draft_tokens: int | None = None  # extension: 0 = plain decoding, None = adaptive
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a decimal string, as JSON keys are) -> bias
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    # OpenAI's json_object / json_schema, and the extensions regex, grammar (Lark) and choice:
    # response_format.py reads it.
    response_format: dict[str, Any] | None = None
    # Accepted only at the value that changes nothing (below, `unsupported`): a request that
    # asks for more is refused with a 400 that names the field.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # means nothing without tools

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, or None."""
        inert: dict[str, tuple] = {
            "tools": (None, []),
            "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
            **self._inert_extra(),
        }
        for name, allowed in inert.items():
            value = getattr(self, name)
            # By type too: a penalty of 0 (int) or 0.0 is inert, but True is not 1.
            if not any(value == a and type(value) is type(a) for a in allowed):
                return name
        return None

    def _inert_extra(self) -> dict[str, tuple]:
        return {}

    def token_biases(self) -> dict[int, float]:
        """logit_bias with its keys read as token ids."""
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            biases[int(key)] = bias
        return biases

    def requested_logprobs(self) -> int | None:
        """How many alternatives each token's log probability comes with; None: none asked."""
        raise NotImplementedError


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def _inert_extra(self) -> dict[str, tuple]:
        return {"echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None:
            raise InvalidRequestError("top_logprobs is a chat field; completions take logprobs=N", "top_logprobs")
        if self.logprobs is None:
            return None
        if isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}", "logprobs")
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Per-message extras (a participant's `name`) do not change what the model reads here.
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)

    def requested_logprobs(self) -> int | None:
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise InvalidRequestError("logprobs must be true or false (top_logprobs=N asks for alternatives)",
                                      "logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs=true", "top_logprobs")
            return None
        return self.top_logprobs or 0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def speculative(stats: GenerationStats, drafter: str) -> dict[str, Any]:
    return {"drafter": drafter, "drafted_tokens": stats.drafted_tokens, "accepted_tokens": stats.accepted_tokens,
            "acceptance_rate": stats.acceptance_rate, "mean_accepted_length": stats.mean_accepted_length,
            "target_forward_passes": stats.target_forward_passes}


def completion_response(rid: str, model: str, outs: list[GenerationOutput], drafter: str,
                        logprobs: list[dict[str, Any] | None]) -> dict[str, Any]:
    """outs: the request's n choices, in order."""
    stats = GenerationStats.of_choices([out.stats for out in outs])
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}
                        for i, (out, lp) in enumerate(zip(outs, logprobs))],
            "usage": usage(stats), "speculative": speculative(stats, drafter)}


def chat_response(rid: str, model: str, outs: list[GenerationOutput], drafter: str,
                  logprobs: list[dict[str, Any] | None]) -> dict[str, Any]:
    stats = GenerationStats.of_choices([out.stats for out in outs])
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": out.text},
                         "logprobs": lp, "finish_reason": out.finish_reason}
                        for i, (out, lp) in enumerate(zip(outs, logprobs))],
            "usage": usage(stats), "speculative": speculative(stats, drafter)}


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None,
                     stats: GenerationStats | None = None, drafter: str = "",
                     logprobs: dict[str, Any] | None = None, index: int = 0) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                             "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                          "finish_reason": finish_reason}]}
    if stats is not None:
        chunk["usage"] = usage(stats)
        chunk["speculative"] = speculative(stats, drafter)
    return chunk


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish_reason: str | None,
               stats: GenerationStats | None = None, drafter: str = "",
               logprobs: dict[str, Any] | None = None, index: int = 0) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model,
                             "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish_reason}]}
    if stats is not None:
        chunk["usage"] = usage(stats)
        chunk["speculative"] = speculative(stats, drafter)
    return chunk


def usage_chunk(rid: str, model: str, kind: str, stats: GenerationStats, drafter: str) -> dict[str, Any]:
    """stream_options.include_usage: a last chunk with no choices and the request's usage."""
    return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(stats),
            "speculative": speculative(stats, drafter)}


def completion_logprobs(logprobs: list[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The completions endpoint's shape: parallel lists, offsets counted from the completion's start."""
    texts = [token_text(lp.token_id) for lp in logprobs]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    tops = [{token_text(t): value for t, value in lp.top} for lp in logprobs]
    return {"tokens": texts, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": tops if any(tops) else None, "text_offset": offsets}


def chat_logprobs(logprobs: list[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The chat endpoint's shape: one entry per token, its bytes, its alternatives."""
    def entry(token: int, value: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
