"""The user-facing engine: a target, an optional drafter, and a tokenizer, ready to generate."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

from .backends.base import CausalLM
from .batching import BatchStepper
from .draft_length import CostMemory
from .drafters.base import DrafterFactory
from .drafters.feature import FeatureDrafter
from .drafters.hybrid import HybridDrafter
from .drafters.model import ModelDrafter
from .drafters.ngram import NGramDrafter
from .errors import InvalidRequestError, SpecDecError, VocabularyMismatchError
from .generation import Generation, GenerationOutput
from .grammar import GrammarCompiler
from .sampling_params import SamplingParams

# model: a separate draft model; self: a cheaper copy of the target (draft_models/self_draft.py);
# feature: a feature head on the target's hidden states (draft_models/feature_head.py);
# ngram: prompt lookup; ngram+X: lookup when it matches, X otherwise.
DRAFTERS = ("model", "self", "feature", "ngram", "ngram+model", "ngram+self", "ngram+feature", "none")
MODEL_DRAFTERS = ("model", "self", "feature", "ngram+model", "ngram+self", "ngram+feature")

Prompt = str | Sequence[int]


class Engine:
    def __init__(
        self,
        target: CausalLM,
        tokenizer: Any | None = None,
        drafter: str = "ngram",
        draft_model: CausalLM | None = None,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self.drafter_name = drafter
        self._drafter_factory = _drafter_factory(drafter, target, draft_model)
        self._draft_cost: float | None = None
        self._costs = CostMemory()  # this target and drafter's step costs, learned across requests
        self._batch_stepper: BatchStepper | None = None
        # response_format's compiler: its tokenizer is built at the first constrained request
        self.grammars = grammars or GrammarCompiler(tokenizer, target.vocab_size, target.eos_token_ids)

    def with_drafter(self, drafter: str, draft_model: CausalLM | None = None) -> "Engine":
        """Same target and tokenizer, another drafter (weights are shared, not copied)."""
        return Engine(self.target, self.tokenizer, drafter, draft_model or self.draft_model, self.grammars)

    @property
    def _models(self) -> list[CausalLM]:
        """The models a request runs on: the target, and the draft model if the drafter uses one."""
        uses_draft = self.draft_model is not None and self.drafter_name in MODEL_DRAFTERS
        return [self.target, self.draft_model] if uses_draft else [self.target]

    @property
    def max_context(self) -> int:
        """Positions a request may span, prompt and output: the least of its models'."""
        return min(model.max_context for model in self._models)

    @property
    def shared_kv_cells(self) -> int | None:
        """Cache positions that all running requests share, where a backend pools them
        (llama.cpp's unified cache): the least of its models'. None: each has its own cache."""
        cells = [model.kv_cells for model in self._models if model.kv_cells is not None]
        return min(cells) if cells else None

    def reserve_sequences(self, count: int) -> None:
        """Prepare the models for `count` requests running together (a server's batch): on the
        GPU path their caches come from one pool, so every batched step runs as one captured
        graph. A no-op for models that need no preparing."""
        for model in {id(m): m for m in (self.target, self.draft_model) if m is not None}.values():
            model.reserve_sequences(count)

    # ---- requests --------------------------------------------------------------------------
    def start(self, prompt: Prompt, params: SamplingParams) -> Generation:
        """Validate a request and return its generation, ready to `step()` (it takes its caches
        at its first step, on the thread that steps it)."""
        return self._start(self.encode(prompt), params)

    def start_chat(self, messages: list[dict[str, str]], params: SamplingParams) -> Generation:
        """`start` for chat messages, through the tokenizer's chat template."""
        return self._start(self.encode_chat(messages), params)

    @property
    def batch_stepper(self) -> BatchStepper:
        """This engine's batched loop (batching.py), as a server runs it: `batch_stepper.step(generations)`
        advances every running generation by one step. One per engine, so its planner keeps
        what it learns of the batched passes' costs."""
        if self._batch_stepper is None:
            self._batch_stepper = BatchStepper(self.target)
        return self._batch_stepper

    def _start(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer, and this model has none", "stop")
        self._check_length(len(prompt_ids), params.max_new_tokens)
        if params.logit_bias and params.logit_bias[-1][0] >= self.target.vocab_size:
            raise InvalidRequestError(f"logit_bias names token {params.logit_bias[-1][0]}, outside the vocabulary "
                                      f"of {self.target.vocab_size} tokens", "logit_bias")
        grammar = None if params.response_format is None else self.grammars.state(params.response_format)
        drafter = self._drafter_factory() if self._drafter_factory and params.num_draft_tokens != 0 else None
        return Generation(self.target, drafter, prompt_ids, params, self.tokenizer, self._relative_draft_cost(),
                          self._costs, grammar)

    def generate(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, num_draft_tokens: int | None = None,
                 stop: str | Sequence[str] | None = None, **options: Any) -> GenerationOutput:
        """options: the rest of SamplingParams: logprobs=N reports each output token's log
        probability and its N most likely alternatives (GenerationOutput.logprobs);
        presence_penalty, frequency_penalty and logit_bias ({token id: bias}) as OpenAI's;
        response_format: a grammar the output follows, as OpenAI's ({"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}}} or {"type": "json_object"}), or
        {"type": "regex", "regex": ...}, {"type": "grammar", "grammar": LARK}, {"type": "choice",
        "choice": [...]}."""
        params = _params(max_new_tokens, temperature, top_p, top_k, seed, num_draft_tokens, stop, **options)
        return self.start(prompt, params).run()

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, num_draft_tokens: int | None = None,
               stop: str | Sequence[str] | None = None, **options: Any) -> Iterator[str]:
        """Yield text deltas as the target accepts tokens (options: as generate's)."""
        params = _params(max_new_tokens, temperature, top_p, top_k, seed, num_draft_tokens, stop, **options)
        with self.start(prompt, params) as generation:  # a consumer that stops early frees the caches too
            while not generation.finished:
                text = generation.step().text
                if text:
                    yield text

    def _relative_draft_cost(self) -> float:
        if self.draft_model is None or not self.drafter_name.endswith(("model", "self", "feature")):
            return 0.0
        if self._draft_cost is None:
            target_flops = self.target.flops_per_token()
            self._draft_cost = self.draft_model.flops_per_token() / target_flops if target_flops else 0.0
        return self._draft_cost

    # ---- prompts ---------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", "prompt")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass the prompt as a list of token ids", "prompt")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = list(prompt)
            if not ids:
                raise InvalidRequestError("prompt is empty", "prompt")
            vocab = self.target.vocab_size
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages is empty", "messages")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.target.name!r} has no chat template: use the completions endpoint / a plain prompt",
                "messages",
            )
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja's TemplateError and what templates raise: the messages' fault
            raise InvalidRequestError(f"the model's chat template refused these messages: {exc}", "messages") from None
        if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (the token field of reported log probabilities)."""
        return self.tokenizer.decode([token_id]) if self.tokenizer else str(token_id)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True) if self.tokenizer else ""

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        context = self.max_context
        if prompt_tokens >= context:
            raise InvalidRequestError(
                f"prompt has {prompt_tokens} tokens, but model {self.target.name!r} has a context of {context}"
                + ("" if context == self.target.max_context else " with this draft model"), "prompt"
            )
        if prompt_tokens + max_new_tokens > context:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                f"of {context} tokens",
                "max_new_tokens",
            )


def _params(max_new_tokens, temperature, top_p, top_k, seed, num_draft_tokens, stop, **options) -> SamplingParams:
    stop_tuple = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if options.get("logit_bias") is None:
        options.pop("logit_bias", None)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=seed, num_draft_tokens=num_draft_tokens, stop=stop_tuple, **options)


def _drafter_factory(name: str, target: CausalLM, draft_model: CausalLM | None) -> DrafterFactory | None:
    if name not in DRAFTERS:
        raise SpecDecError(f"unknown drafter {name!r}: choose one of {', '.join(DRAFTERS)}")
    if name == "none":
        return None
    if name == "ngram":
        return NGramDrafter
    if draft_model is None:
        raise SpecDecError(f"drafter {name!r} needs a draft model (--draft / draft=...)")
    check_vocabularies(target, draft_model)
    if getattr(draft_model, "reads_features", False) != name.endswith("feature"):
        raise SpecDecError(f"drafter {name!r} does not fit draft {draft_model.name!r}: a feature head drafts with "
                           "'feature' or 'ngram+feature', a draft model with the other model drafters")
    drafter_class = FeatureDrafter if name.endswith("feature") else ModelDrafter
    if name.startswith("ngram+"):
        return lambda: HybridDrafter(drafter_class(draft_model))
    return lambda: drafter_class(draft_model)


def check_vocabularies(target: CausalLM, draft: CausalLM) -> None:
    if target.output_token_ids is not None:
        raise VocabularyMismatchError(
            f"target {target.name!r} scores only part of its vocabulary: the target must score every token"
        )
    if target.vocab_size != draft.vocab_size:
        raise VocabularyMismatchError(
            f"draft {draft.name!r} has a vocabulary of {draft.vocab_size} tokens but target {target.name!r} has "
            f"{target.vocab_size}: speculative decoding needs one shared vocabulary, since the target verifies "
            f"the draft's token ids directly"
        )
