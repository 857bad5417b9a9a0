"""The OpenAI wire format: request models (validated) and response / chunk builders."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..generation import GenerationOutput
from ..stats import GenerationStats

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    n: int | None = None
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = None
    num_draft_tokens: int | None = None  # extension: 0 = plain decoding, None = adaptive
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def speculative(stats: GenerationStats, drafter: str) -> dict[str, Any]:
    return {"drafter": drafter, "drafted_tokens": stats.drafted_tokens, "accepted_tokens": stats.accepted_tokens,
            "acceptance_rate": stats.acceptance_rate, "mean_accepted_length": stats.mean_accepted_length,
            "target_forward_passes": stats.target_forward_passes}


def completion_response(rid: str, model: str, out: GenerationOutput, drafter: str) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}],
            "usage": usage(out.stats), "speculative": speculative(out.stats, drafter)}


def chat_response(rid: str, model: str, out: GenerationOutput, drafter: str) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "logprobs": None, "finish_reason": out.finish_reason}],
            "usage": usage(out.stats), "speculative": speculative(out.stats, drafter)}


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None,
                     stats: GenerationStats | None = None, drafter: str = "") -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if stats is not None:
        chunk["usage"] = usage(stats)
        chunk["speculative"] = speculative(stats, drafter)
    return chunk


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish_reason: str | None,
               stats: GenerationStats | None = None, drafter: str = "") -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model,
                             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]}
    if stats is not None:
        chunk["usage"] = usage(stats)
        chunk["speculative"] = speculative(stats, drafter)
    return chunk


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
