"""Per-request sampling settings, validated once at the door."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequestError
from .response_format import ResponseFormat
from .token_logprobs import MAX_TOP_LOGPROBS

MAX_NEW_TOKENS_LIMIT = 1_000_000
# The most tokens one step drafts, asked for (num_draft_tokens) or chosen (draft_length.py);
# a verify of k + 1 positions fits the GPU path's captured steps and kernels (16 rows).
MAX_DRAFT_TOKENS = 12
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256  # each; the text stream looks for every stop string after every step
MAX_PENALTY = 2.0  # presence and frequency penalties, as OpenAI's API bounds them
MAX_LOGIT_BIAS = 100.0  # per token, as OpenAI's API
MAX_LOGIT_BIAS_TOKENS = 300


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
    # OpenAI's: subtracted from a token's logit once if it occurs in the output so far
    # (presence), once per occurrence (frequency); logit_processing.py applies them.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias added to its logit) pairs; a dict {id: bias} is accepted too.
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    # A grammar the output must follow (grammar.py); OpenAI's dict form is accepted too.
    response_format: ResponseFormat | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequestError(f"{name} must be a number from -{MAX_PENALTY} to {MAX_PENALTY}, "
                                          f"got {value!r}", name)
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        object.__setattr__(self, "response_format", ResponseFormat.parse(self.response_format))
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


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    pairs = list(value.items()) if isinstance(value, dict) else value
    try:
        pairs = [(token, bias) for token, bias in pairs]
    except (TypeError, ValueError):
        raise InvalidRequestError("logit_bias must map token ids to numbers", "logit_bias") from None
    if len(pairs) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidRequestError(f"logit_bias may name at most {MAX_LOGIT_BIAS_TOKENS} tokens", "logit_bias")
    out: dict[int, float] = {}
    for token, bias in pairs:
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InvalidRequestError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}",
                                      "logit_bias")
        if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias values must be numbers from -100 to 100, got {bias!r}",
                                      "logit_bias")
        if token in out:
            raise InvalidRequestError(f"logit_bias names token {token} twice", "logit_bias")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}", name)
