"""One request in flight: the speculative decoding loop, one step at a time.

Each `step()` is propose -> verify -> accept -> commit -> emit:
  propose  the drafter offers up to k tokens after the sequence so far;
  verify   one target forward over [last, d1..dk] gives k+1 next-token distributions;
  accept   the longest agreeing prefix is kept, plus one recovered or bonus token;
  commit   the target's KV cache is rewound to the accepted length (a length change);
  emit     the new tokens become text, checked for EOS, stop strings and the length limit.

Invariant between steps: the target's cache holds every token but the last one, which is
fed at the head of the next verify pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generator

import torch

from . import trace
from .acceptance import Verdict, verify_greedy, verify_sampled
from .backends.base import CausalLM, ChainsGreedySteps, pinned
from .draft_length import CostMemory, DraftLengthPolicy
from .drafters.base import Drafter, DraftFeed, DraftProposal, ProposalSteps, empty_proposal, run_alone
from .grammar import GrammarState, forced_proposal
from .logit_processing import adjusted_logits, adjusts_logits
from .logits import to_probs
from .sampling_params import MAX_DRAFT_TOKENS, SamplingParams
from .stats import DRAFT, TARGET, GenerationStats
from .text_stream import TextStream
from .token_logprobs import TokenLogprob, token_logprobs

# Longest prompt that a batch's joining request reads inside the shared verify pass. With its
# drafts it stays within what one packed pass takes (compact_decoder.PREFILL_CHUNK, 1024); a
# longer prompt costs far more than the step it would save, and takes a pass of its own.
PROMPT_IN_VERIFY_MAX = 512


@dataclass
class StepOutput:
    token_ids: list[int]  # tokens this step added to the output
    text: str  # text delta safe to show (may be empty while a stop string could still form)
    finished: bool
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    logprobs: list[TokenLogprob] | None = None  # per token of token_ids, when the request asks


@dataclass(frozen=True)
class DraftedStep:
    proposal: DraftProposal
    verify_ids: torch.Tensor  # [k+1]: the last accepted token, then the k drafts (a prompt read in the verify: all of it)
    draft_s: float  # seconds the proposal took

    @property
    def num_logits(self) -> int:
        """The verify pass's positions whose logits the verdict reads: the last token's and the drafts'."""
        return self.proposal.tokens.shape[0] + 1


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # generated tokens only, not the prompt
    stats: GenerationStats
    finish_reason: str | None = None
    provenance: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # per generated token, when the request asks


class Generation:
    def __init__(
        self,
        target: CausalLM,
        drafter: Drafter | None,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Any | None,
        relative_draft_cost: float = 0.0,
        costs: CostMemory | None = None,
        grammar: GrammarState | None = None,
    ) -> None:
        """relative_draft_cost: a draft token's estimated compute over a target pass's, used
        for k instead of timings when a seeded sample must be reproducible.
        costs: the verify and draft costs learned by earlier generations of this target and
        drafter (draft_length.CostMemory), refined by this one.
        grammar: the request's response_format, compiled (engine.py); None: unconstrained."""
        self.target = target
        self.drafter = drafter
        self.params = params
        self.grammar = grammar
        # This step's drafts: whether the drafter proposed any (it is then told the outcome) and
        # how many of them the grammar kept (the rest of the step's drafts are forced tokens).
        self._drafter_proposed, self._by_drafter = 0, 0
        reproducible = params.seed is not None and not params.greedy
        self.policy = DraftLengthPolicy(fixed=params.num_draft_tokens,
                                        timing_free_draft_cost=relative_draft_cost if reproducible else None,
                                        costs=costs)
        self._drafted_before = False  # the draft model's first proposal reads the whole prompt
        self.max_length = min(len(prompt_ids) + params.max_new_tokens, target.max_context)
        self.tokens = torch.empty(self.max_length, dtype=torch.long)  # prompt + output, preallocated
        self.tokens[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        self.prompt_length = self.length = len(prompt_ids)
        # Taken by open() on the thread that steps this generation (a server's scheduler
        # thread), never where it is made: a backend's cache calls must not race its passes.
        self.cache: Any = None
        self.closed = False
        self.generator = _generator(target.device, params.seed)
        self.text_stream = TextStream(tokenizer, params.stop)
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.finished = False
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self._started: float | None = None
        self._prompt_unread = False  # the prompt is read by this step's verify pass (a batch's joiner)
        self._prompt_may_join_verify = False  # decided by open()
        adaptive = params.num_draft_tokens is None and drafter is not None and not reproducible
        self._synchronize = torch.cuda.synchronize if adaptive and target.device.type == "cuda" else None
        # Plain greedy decoding on a model that chains its steps on the device (GPU graphs).
        plain = drafter is None or params.num_draft_tokens == 0
        # (A chained step's logits stay on the device: log probabilities take the ordinary step.)
        self._chained = (plain and params.greedy and params.logprobs is None and not self.processes_logits
                         and isinstance(target, ChainsGreedySteps))
        self._chain = None

    @property
    def processes_logits(self) -> bool:
        """Whether the verdict reads processed logits (penalties, biases, a grammar's mask), so
        a batch must leave it to `conclude` instead of reading the raw rows' picks."""
        return self.grammar is not None or adjusts_logits(self.params)

    # ---- lifetime -------------------------------------------------------------------------
    def open(self) -> None:
        """Take this sequence's caches (the first step does it). Call it on the thread that
        steps the generation: llama.cpp and the GPU pool are not safe across threads."""
        if self.closed:
            raise RuntimeError("generation is closed: its caches were handed back")
        if self.cache is not None:
            return
        self.cache = self.target.new_cache()
        if self.drafter is not None:  # a self-draft reads context it has not seen from the target's cache
            self.drafter.share_context(self.target, self.cache)
        # A self-draft copies the prompt from the target's cache instead of reading it: there
        # the target must have read it before the draft.
        self._prompt_may_join_verify = (self.prompt_length <= PROMPT_IN_VERIFY_MAX
                                        and not (self.drafter is not None and self.drafter.reads_target_cache))

    def close(self) -> None:
        """Hand the caches back now: on finishing, and when a request is cancelled or fails.
        Safe to call more than once; the generation cannot step after it. A generation that
        is never closed keeps its sequence slot (on llama.cpp and the GPU pool) for good."""
        if self.closed:
            return
        self.closed = True
        self._chain = None  # its queued steps write only into the cache handed back here
        if self.cache is not None:
            self.target.release(self.cache)
        if self.drafter is not None:
            self.drafter.release()

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> StepOutput:
        if self._chained:
            return self._chained_step()
        draft = self.draft()
        started = time.perf_counter()
        target_logits = self.target.forward(draft.verify_ids, self.cache, num_logits=draft.num_logits)
        return self.conclude(draft, target_logits, started)

    def draft(self, k: int | None = None) -> "DraftedStep":
        """Propose this step's draft (k tokens, or the policy's choice) and return what the
        target must verify: a batch (batching.py) verifies many sequences in one pass."""
        return run_alone(self.draft_steps(k))

    def draft_steps(self, k: int | None = None, timed: bool = True,
                    prompt_in_verify: bool = False) -> Generator[DraftFeed, torch.Tensor, "DraftedStep"]:
        """`draft` as steps: yields each draft-model pass it needs (a batch feeds many at once).
        timed=False: a GPU draft is not waited for to time it (a batch times its drafts itself).
        prompt_in_verify: a new request's prompt is not read by a pass of its own but at the
        head of its first verify feed, which a batch runs in its shared pass (so the others'
        step reads the weights once, not twice); prompts over PROMPT_IN_VERIFY_MAX tokens, and
        those a self-draft copies from the target's cache, are read on their own as before."""
        if self.finished:
            raise RuntimeError("generation already finished")
        self.open()
        if self._started is None:
            if prompt_in_verify and self._prompt_may_join_verify:
                self._started, self._prompt_unread = time.perf_counter(), True
            else:
                self._prefill()
        if self._chain is not None:  # a batch drives this chained generation now (batching.py)
            self._unchain()
        started = time.perf_counter()
        proposal = yield from self._propose(k)
        if timed and self._synchronize is not None:  # GPU work is asynchronous: the draft's time is its finish
            self._synchronize()
        # Draft tokens stay where the drafter made them: a GPU draft is not waited for here.
        device = proposal.tokens.device
        unread = self.tokens[0 if self._prompt_unread else self.length - 1 : self.length]
        if device.type == "cuda":  # queued behind the drafts, not waited for
            unread = pinned(unread).to(device, non_blocking=True)
        verify_ids = torch.cat([unread, proposal.tokens])  # [k+1], or the prompt's length + k
        return DraftedStep(proposal, verify_ids, time.perf_counter() - started)

    def conclude(self, draft: "DraftedStep", target_logits: torch.Tensor,
                 verify_started: float | None = None, verdict: Verdict | None = None) -> StepOutput:
        """target_logits: [k+1, vocab] of the verify pass over draft.verify_ids, whose keys and
        values are now in this sequence's cache. Accept, rewind, emit. verify_started: when
        this sequence's own verify pass began (None in a shared pass: the batch times that).
        verdict: already reached for these logits (a batch reads its greedy verdicts at once)."""
        if verdict is None:
            verdict = self._accept(target_logits, draft.proposal)
            trace.mark("verdict")
        # After accept: its host read waits for the device's work.
        verify_s = None if verify_started is None else time.perf_counter() - verify_started
        self._commit(draft.proposal, verdict, draft_s=draft.draft_s, verify_s=verify_s)
        trace.mark("committed")
        out = self._emit(draft.proposal, verdict, target_logits)
        trace.mark("emitted")
        if out.finished:
            self.close()
        return out

    def _chained_step(self) -> StepOutput:
        """A plain greedy step whose successor is already queued on the device when its token
        is read (GreedyChain): the host's work per token overlaps the next step."""
        if self.finished:
            raise RuntimeError("generation already finished")
        self.open()
        if self._chain is None:
            if self._started is None:
                self._prefill()
            self._chain = self.target.greedy_chain(self.cache, int(self.tokens[self.length - 1]))
        # Keep one step queued behind the one read now, unless the token budget ends first.
        while self._chain.queued < 2 and self.length + self._chain.queued < self.max_length:
            self._chain.launch()
        verdict = Verdict(num_accepted=0, next_token=self._chain.take())
        self.stats.record_step(0, 0, 0, 0)
        out = self._emit(empty_proposal(), verdict)
        if out.finished:
            self._unchain()
            self.close()
        return out

    def _unchain(self) -> None:
        """Back to the loop's invariant: the chain's cache holds the newest token too, and
        any step queued after it; those are dropped (a later step() starts a new chain)."""
        self._chain = None
        self.target.rewind(self.cache, self.length - 1)

    def _prefill(self) -> None:
        self._started = time.perf_counter()
        self.target.prefill(self.tokens[: self.length - 1], self.cache)
        self.stats.prefill_time_s = time.perf_counter() - self._started

    @property
    def prefilled(self) -> bool:
        """Whether the prompt has been read (a new request reads it in its first step)."""
        return self._started is not None

    @property
    def draft_budget(self) -> int:
        """Most tokens the next step may draft: it emits up to k+1, within the token budget
        and the context; 0 without a drafter."""
        return 0 if self.drafter is None else max(0, self.max_length - self.length - 1)

    def _propose(self, k: int | None) -> ProposalSteps:
        budget = self.draft_budget
        self._drafter_proposed, self._by_drafter = 0, 0
        if budget == 0 or k == 0:
            return empty_proposal()
        room = min(budget, MAX_DRAFT_TOKENS)  # what a verify pass takes
        if self.grammar is not None and (forced := self.grammar.forced(room)):
            return forced_proposal(forced)  # the drafter sits this step out and is not told
        if k is None:
            k = self.policy.next(budget)
            if self.policy.adaptive:  # a k from timings: every process of a split target runs rank 0's
                k = self.target.agreed_draft_lengths([k])[0]
        else:
            k = min(k, budget)
        if k == 0:
            return empty_proposal()
        proposal = yield from self.drafter.proposal_steps(self.tokens[: self.length], k, self.params, self.generator)
        self._drafter_proposed = self._by_drafter = proposal.tokens.shape[0]
        if self.grammar is not None:
            proposal, self._by_drafter = self.grammar.checked(proposal, room)
        return proposal

    def _accept(self, target_logits: torch.Tensor, proposal: DraftProposal) -> Verdict:
        if adjusts_logits(self.params):  # penalties and biases, as plain decoding has them at each row
            target_logits = adjusted_logits(target_logits, self.params,
                                            self.tokens[self.prompt_length : self.length], proposal.tokens)
        if self.grammar is not None:  # after them, as plain constrained decoding masks what it samples from
            target_logits = self.grammar.masked(target_logits, proposal.tokens)
        if self.params.greedy:  # host drafts stay on the host: verify_greedy reads the target's picks once
            return verify_greedy(target_logits, proposal.tokens)
        draft_tokens = proposal.tokens.to(target_logits.device)
        target_probs = to_probs(target_logits, self.params)
        draft_probs = proposal.probs.to(target_logits.device) if proposal.probs is not None else None
        return verify_sampled(target_probs, draft_tokens, draft_probs, self.generator)

    def _commit(self, proposal: DraftProposal, verdict: Verdict, draft_s: float, verify_s: float | None) -> None:
        # The cache now holds [.., last, d1..dk]; keep [.., last, d1..dn].
        self.target.rewind(self.cache, self.length + verdict.num_accepted)
        if self._prompt_unread:  # read in this step's shared pass: the prompt took this step
            self._prompt_unread = False
            self.stats.prefill_time_s = time.perf_counter() - self._started
        num_drafted = proposal.tokens.shape[0]
        # The drafter and the draft-length policy learn from the drafter's own tokens only: a
        # grammar's forced ones are accepted whatever the drafter would have said.
        by_drafter, accepted = self._by_drafter, min(verdict.num_accepted, self._by_drafter)
        if self._drafter_proposed:
            self.drafter.observe(accepted)
        if self._drafter_proposed or not num_drafted:
            # A draft model catching up (on the prompt, or on the tokens of steps without a
            # draft) reads many positions: not a per-token cost. After the prompt it is what
            # resuming (a probe) costs, which the policy weighs.
            catching_up = proposal.positions > 2 * max(by_drafter, 1)
            resuming = catching_up and by_drafter > 0 and self._drafted_before
            self.policy.record_step(by_drafter, accepted, verify_s=verify_s,
                                    draft_s=None if catching_up else draft_s, resume_s=draft_s if resuming else None)
            self._drafted_before = self._drafted_before or bool(by_drafter)
        self.stats.record_step(num_drafted, verdict.num_accepted, proposal.forward_passes, proposal.positions)

    def _emit(self, proposal: DraftProposal, verdict: Verdict, target_logits: torch.Tensor | None = None) -> StepOutput:
        """target_logits: the verify pass's rows [k+1, vocab], read for log probabilities."""
        new_ids = proposal.tokens[: verdict.num_accepted].tolist() + [verdict.next_token]
        provenance = [DRAFT] * verdict.num_accepted + [TARGET]
        finish_reason = None
        eos_at = next((i for i, t in enumerate(new_ids) if t in self.target.eos_token_ids), None)
        if eos_at is not None:
            new_ids, provenance, finish_reason = new_ids[: eos_at + 1], provenance[: eos_at + 1], "stop"
        text, stop_at = self.text_stream.push(new_ids)
        if stop_at is not None:
            new_ids, provenance, finish_reason = new_ids[: stop_at + 1], provenance[: stop_at + 1], "stop"
        if self.grammar is not None:
            self.grammar.advance(new_ids)
        logprobs = None
        if self.logprobs is not None:  # before the next pass: llama.cpp's logits are a view of its buffer
            logprobs = token_logprobs(target_logits, new_ids, self.params.logprobs)
            self.logprobs.extend(logprobs)
        self.tokens[self.length : self.length + len(new_ids)] = torch.tensor(new_ids, dtype=torch.long)
        self.length += len(new_ids)
        self.stats.generated_tokens += len(new_ids)
        self.stats.provenance.extend(provenance)
        if finish_reason is None and self.length >= self.max_length:
            finish_reason = "length"
        now = time.perf_counter()
        if not self.stats.time_to_first_token_s:
            self.stats.time_to_first_token_s = now - self._started
        self.stats.wall_time_s = now - self._started
        if finish_reason is not None:
            self.finished = True
            self.stats.finish_reason = finish_reason
            text += self.text_stream.finish()
        return StepOutput(new_ids, text, self.finished, finish_reason, logprobs)

    # ---- results ----------------------------------------------------------------------------
    def output(self) -> GenerationOutput:
        return GenerationOutput(
            text=self.text_stream.text,
            token_ids=self.tokens[self.prompt_length : self.length].tolist(),
            stats=self.stats,
            finish_reason=self.stats.finish_reason,
            provenance=list(self.stats.provenance),
            logprobs=None if self.logprobs is None else list(self.logprobs),
        )

    def run(self) -> GenerationOutput:
        with self:
            while not self.finished:
                self.step()
        return self.output()


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
