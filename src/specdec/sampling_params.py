"""Per-request sampling settings, validated once at the door."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequestError
from .token_logprobs import MAX_TOP_LOGPROBS

MAX_NEW_TOKENS_LIMIT = 1_000_000
# The most tokens one step drafts, asked for (num_draft_tokens) or chosen (draft_length.py);
# a verify of k + 1 positions fits the GPU path's captured steps and kernels (16 rows).
MAX_DRAFT_TOKENS = 12
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256  # each; the text stream looks for every stop string after every step


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 means greedy (and ignores top_p / top_k)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # None: adaptive draft length; 0: plain decoding (no drafting); k > 0: fixed k.
    num_draft_tokens: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # None: no log probabilities; n >= 0: each output token's, with its n most likely alternatives.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
        if not _is_number(self.temperature) or self.temperature < 0 or self.temperature != self.temperature:
            raise InvalidRequestError(f"temperature must be a number >= 0, got {self.temperature!r}", "temperature")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        _check_int("top_k", self.top_k, 0, None)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.num_draft_tokens is not None:
            _check_int("num_draft_tokens", self.num_draft_tokens, 0, MAX_DRAFT_TOKENS)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        for s in stop:
            if not isinstance(s, str) or s == "":
                raise InvalidRequestError("stop must be a non-empty string or a list of them", "stop")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidRequestError(f"each stop string may have at most {MAX_STOP_CHARS} characters", "stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}", name)
