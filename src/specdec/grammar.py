"""Structured outputs: a grammar masks every verified row, and the tokens it forces are free drafts.

A request's `response_format` (OpenAI's `json_object` / `json_schema`, or the extensions
`regex`, `grammar` (Lark) and `choice`) becomes an llguidance matcher over the target's
tokenizer. The constraint is that of plain constrained decoding, row by row: a verify pass's
row j is masked by the grammar's state after the output and the drafts d_1..d_j, so the
verdict reads exactly the distributions constrained plain decoding would sample from. Drafts
the grammar refuses are cut before the verify: a deterministic draft at the refused token
(it would be rejected, and the resample from max(0, p - onehot) is p itself), a sampled draft
just after it (its rejection, certain as p(d) = 0, then resamples from its q's residual).
Where the grammar allows one continuation only (a JSON key, the punctuation between fields),
those tokens are drafted at no model cost; they are verified like any draft.

llguidance was chosen by measured mask cost on this project's CPU (the default model's 262k
vocabulary, a 4-field schema): 22 µs a mask (xgrammar: 12 µs), with calls made for speculation
(forced tokens, rollback, validating a draft); both are far below a 10 ms step.
"""
from __future__ import annotations

import json
import threading
from dataclasses import replace
from typing import Any

import torch

from .drafters.base import DraftProposal
from .errors import InvalidRequestError
from .response_format import FIELD, ResponseFormat

# Compact JSON (", " and ": " between items, no other whitespace): the model cannot wander
# into whitespace, and the skeleton between values is forced, so drafted for free.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)  # a mask word's bits


class GrammarCompiler:
    """Compiles constraints against one target's tokenizer. The tokenizer's llguidance form is
    built at first use (seconds for a 262k vocabulary) and shared by every request after."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, eos_token_ids: frozenset[int] | set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self._lltokenizer: Any = None
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Build the tokenizer's llguidance form now, once (the server's first constrained request
        does it off the event loop: server/app.py)."""
        if self._lltokenizer is not None:
            return
        if self.tokenizer is None:
            raise InvalidRequestError("response_format needs a tokenizer, and this model has none", FIELD)
        with self._lock:
            if self._lltokenizer is None:
                import llguidance.hf

                # The target's EOS ids end a grammar's output; a target without them, the
                # tokenizer's own EOS (its column may lie past the logits': then never drawn).
                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=max(self.vocab_size, len(self.tokenizer)),
                    eos_token=sorted(self.eos_token_ids) or None)

    def state(self, response_format: ResponseFormat) -> "GrammarState":
        """A new request's grammar state; a constraint that does not compile is refused by name."""
        from llguidance import LLMatcher

        self.prepare()
        try:
            grammar = grammar_text(response_format)
        except ValueError as exc:  # a schema that is not JSON
            raise InvalidRequestError(f"bad {response_format.kind}: {exc}", FIELD) from None
        matcher = LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"bad {response_format.kind}: {_one_line(matcher.get_error())}", FIELD)
        return GrammarState(matcher, self._lltokenizer.vocab_size, self.eos_token_ids)


class GrammarState:
    """One request's place in its grammar, always after the output so far (the tokens committed);
    what a step tries on top of that (drafts) is rolled back before the step ends."""

    def __init__(self, matcher: Any, mask_size: int, eos_token_ids: frozenset[int]) -> None:
        """mask_size: the tokens the grammar's masks cover (the tokenizer's and the logits' columns)."""
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids
        self._words = (mask_size + 31) // 32

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces next: free drafts."""
        return self.matcher.compute_ff_tokens()[:limit] if limit > 0 else []

    def checked(self, proposal: DraftProposal, limit: int) -> tuple[DraftProposal, int]:
        """The proposal cut where the grammar refuses a draft (see the module's note), then
        extended by the tokens the grammar forces after it, to at most `limit` tokens. Also
        returns how many of its tokens are the drafter's."""
        drafts = proposal.tokens.tolist()
        valid = self.matcher.validate_tokens(drafts)
        if valid < len(drafts) and proposal.probs is not None:  # keep the refused one: see above
            return _cut(proposal, valid + 1), valid + 1
        proposal = _cut(proposal, valid)
        if any(t in self.eos_token_ids for t in drafts[:valid]):
            return proposal, valid
        self._consume(drafts[:valid])
        forced = self.forced(limit - valid)
        self.matcher.rollback(valid)
        return _extended(proposal, forced), valid

    def masked(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] of a verify pass over [last, d_1..d_k]: row j masked by the state
        after d_1..d_j (rows past a refused draft or an EOS stay as they are: never read)."""
        rows = logits.shape[0]
        tokens = drafts[: rows - 1].tolist()
        bitmask = torch.full((rows, self._words), -1, dtype=torch.int32)
        consumed = 0
        for j in range(rows):
            row = bitmask[j]
            self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
            if self.matcher.is_error():
                raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
            # (try_consume: a refused token would leave the matcher in its error state for good)
            if j == rows - 1 or tokens[j] in self.eos_token_ids or not self.matcher.try_consume_tokens([tokens[j]]):
                break
            consumed += 1
        self.matcher.rollback(consumed)
        allowed = (bitmask.unsqueeze(-1) & _BITS).ne(0).view(rows, -1)[:, : logits.shape[1]]
        if allowed.shape[1] < logits.shape[1]:  # columns past the tokenizer's vocabulary: never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(rows, logits.shape[1] - allowed.shape[1])], dim=1)
        out = logits.float().clone()
        out.masked_fill_(~allowed.to(out.device, non_blocking=True), float("-inf"))
        return out

    def advance(self, tokens: list[int]) -> None:
        """Commit the step's output tokens (EOS ends the output and is not consumed)."""
        self._consume([t for t in tokens if t not in self.eos_token_ids])

    def _consume(self, tokens: list[int]) -> None:
        if tokens and not self.matcher.consume_tokens(tokens):
            raise RuntimeError(f"grammar matcher refused committed tokens: {self.matcher.get_error()}")


def grammar_text(response_format: ResponseFormat) -> str:
    """llguidance's grammar text for a constraint."""
    from llguidance import LLMatcher

    kind, spec = response_format.kind, response_format.spec
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec, overrides=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec)))
    return LLMatcher.grammar_from_lark(spec)


def _cut(proposal: DraftProposal, n: int) -> DraftProposal:
    if n >= proposal.tokens.shape[0]:
        return proposal
    return replace(proposal, tokens=proposal.tokens[:n], probs=None if proposal.probs is None else proposal.probs[:n])


def _extended(proposal: DraftProposal, forced: list[int]) -> DraftProposal:
    if not forced:
        return proposal
    extra = torch.tensor(forced, dtype=torch.long, device=proposal.tokens.device)
    probs = proposal.probs
    if probs is not None:  # a forced draft is deterministic: q is one-hot
        onehot = probs.new_zeros(len(forced), probs.shape[1])
        onehot[torch.arange(len(forced), device=probs.device), extra.to(probs.device)] = 1.0
        probs = torch.cat([probs, onehot])
    return replace(proposal, tokens=torch.cat([proposal.tokens, extra]), probs=probs)


def forced_proposal(tokens: list[int], device: torch.device | str = "cpu") -> DraftProposal:
    """A step's drafts when the grammar forces what comes next: no model ran for them."""
    return DraftProposal(torch.tensor(tokens, dtype=torch.long, device=device), None, 0, 0)


def _one_line(message: str, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip()) or "invalid"
    return text if len(text) <= limit else text[: limit - 3] + "..."
