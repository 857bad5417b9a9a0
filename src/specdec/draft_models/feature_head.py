"""A feature head (EAGLE-style draft): one decoder layer that predicts the target's next hidden state.

The target's final hidden state f_i at position i (the head's input) already says most of what
its next token will be. The head reads the pair (embedding of token t_{i+1}, f_i) through a
projection `fc` [2h -> h] and one decoder layer of the target's own family and width, and
predicts f_{i+1}; the target's own head rows (a frequent-token subset, extended per sequence
with its context's tokens) turn that into the draft's next token. Rolled out, each prediction is
fed back as the next position's feature. At each step the drafter first replays the positions
the target has just verified with the target's true features (drafters/feature.py).

Directory layout (`specdec distill --method feature`):
  config.json         the transformers config of the one-layer model (the target's family)
  model.safetensors   fc, the layer and the final norm (bfloat16, or int8 rows with scales)
  token_map.json      the token id of each head row
  specdec_draft.json  kind "feature", the target it was trained on (checked at load), how
"""
from __future__ import annotations

import copy
import json
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.base import CausalLM
from ..backends.compact_decoder import CompactCache, CompactDecoder
from ..backends.features import ExposesFeatures
from ..backends.graph_decoder import GraphDecoder
from ..backends.step_graphs import GRAPH_MAX_TOKENS
from ..errors import ModelLoadError, SpecDecError, VocabularyMismatchError
from ..sampling_params import MAX_DRAFT_TOKENS
from .distilled_draft import (
    META_FILE,
    TOKEN_MAP_FILE,
    WEIGHTS_FILE,
    _dequantized,
    _empty_module,
    _read_token_map,
    body_of,
    identity_mismatches,
    stored_weights,
)

FORMAT = 1
KIND = "feature"


def target_text_config(target: CausalLM) -> Any:
    """The `transformers` text config of the target's architecture (a GGUF's from its metadata)."""
    module = getattr(target, "model", None)
    if isinstance(module, nn.Module):
        return module.config.get_text_config()
    path = getattr(target, "path", None)
    if path is None:
        raise SpecDecError(f"target {target.name!r} has no transformers config to build a feature head from")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name).get_text_config()


def target_identity(target: ExposesFeatures, tokenizer: Any | None) -> dict[str, Any]:
    """What a head must agree with: the vocabulary, its ids, and the hidden state's width."""
    key = None
    if tokenizer is not None:
        from .token_frequency import vocabulary_key

        key = vocabulary_key(tokenizer)
    return {"vocab_size": int(target.vocab_size), "hidden_size": int(target.feature_size), "vocabulary_key": key}


def check_identity(directory: Path, recorded: dict[str, Any], actual: dict[str, Any]) -> None:
    if problems := identity_mismatches(recorded, actual):
        raise VocabularyMismatchError(f"the feature head in {directory} was trained for another target: "
                                      + "; ".join(problems) + ". Train one for this target with "
                                      "specdec distill --method feature")


def one_layer_config(target_config: Any) -> Any:
    config = copy.deepcopy(target_config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"]  # the head sees the whole context, as EAGLE's does
    config.architectures = None
    return config


class FeatureHead(nn.Module):
    """The trainable part: fc and a one-layer body (with its final norm) of the target's family."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = _empty_module(AutoModelForCausalLM._model_mapping[type(config)], config)
        hidden = int(config.hidden_size)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)

    @property
    def body(self) -> nn.Module:
        return body_of(self.model)

    def forward(self, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """embeddings of t_{i+1} and features f_i, [batch, n, h] each -> predicted f_{i+1} [batch, n, h]."""
        x = self.fc(torch.cat([embeddings, features], dim=-1))
        return self.body(inputs_embeds=x, use_cache=False).last_hidden_state

    def trained_state(self) -> dict[str, torch.Tensor]:
        state = {f"fc.{k}": v for k, v in self.fc.state_dict().items()}
        state.update({f"body.{k}": v for k, v in self.body.state_dict().items()
                      if k.startswith(("layers.", "norm."))})
        return state


def save_feature_head(directory: Path, head: FeatureHead, token_map: torch.Tensor, identity: dict[str, Any],
                      details: dict[str, Any], storage: str = "bfloat16") -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(stored_weights(head.trained_state(), storage), str(directory / WEIGHTS_FILE))
    head.model.config.save_pretrained(directory)
    (directory / TOKEN_MAP_FILE).write_text(json.dumps(token_map.tolist()))
    meta = {"format": FORMAT, "kind": KIND, "target": identity, "token_map_size": len(token_map), **details}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def is_feature_head(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / META_FILE).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def read_feature_head(directory: str | Path) -> tuple[FeatureHead, torch.Tensor, dict[str, Any]]:
    """The head's module (float32), its token map and its record."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{directory} is not a specdec feature head ({META_FILE}: {exc})") from None
    if meta.get("format") != FORMAT or meta.get("kind") != KIND or "target" not in meta:
        raise ModelLoadError(f"{directory}/{META_FILE} is not a feature head of a known format")
    head = FeatureHead(AutoConfig.from_pretrained(directory))
    try:
        weights = _dequantized(load_file(str(directory / WEIGHTS_FILE)))
    except Exception as exc:  # OSError, or safetensors' own error type for a damaged file
        raise ModelLoadError(f"cannot read the feature head's weights in {directory}: {exc}") from None
    expected = head.trained_state()
    if set(weights) != set(expected):
        raise ModelLoadError(f"the feature head in {directory} does not match its config "
                             f"(missing {sorted(set(expected) - set(weights))[:3]}, "
                             f"unexpected {sorted(set(weights) - set(expected))[:3]})")
    head.fc.load_state_dict({"weight": weights["fc.weight"]})
    head.body.load_state_dict({k.removeprefix("body."): v for k, v in weights.items() if k.startswith("body.")},
                              strict=False)
    head.float().eval().requires_grad_(False)
    return head, _read_token_map(directory, int(meta["target"]["vocab_size"])), meta


def load_feature_head(directory: str | Path, target: CausalLM, tokenizer: Any | None,
                      int8: bool | None = None) -> "FeatureDecoder":
    """The head in `directory` on `target`'s embedding and head rows: on the graph decoder beside
    a GPU target, else on the compact decoder. int8: weight-only int8 products (default: on CPU,
    where a step reads each weight once; on GPU only when asked: an H200 step took 0.28 ms
    against bfloat16's 0.38, but the loop kept less of its ideal, docs/BENCHMARKS.md)."""
    if not isinstance(target, ExposesFeatures) or not getattr(target, "feature_size", 0):
        raise SpecDecError(f"target {target.name!r} does not expose its hidden states on this backend, which a "
                           "feature head needs (torch: the compact decoder on CPU or the graph path on GPU; "
                           "llama.cpp: only where its split head applies)")
    head, token_map, meta = read_feature_head(directory)
    check_identity(Path(directory), meta["target"], target_identity(target, tokenizer))
    if int(target.feature_size) != int(head.fc.out_features):
        raise VocabularyMismatchError(f"the feature head in {directory} is {head.fc.out_features} wide, the "
                                      f"target's hidden state {target.feature_size}")
    name = f"feature head {Path(directory).name}"
    if isinstance(target, GraphDecoder):
        return GraphFeatureDecoder(head, target, token_map, name, int8=bool(int8))
    if int8 is None:
        int8 = target.device.type == "cpu"
    return FeatureDecoder(head, target, token_map, name=name, int8=int8)


class FeatureCache(CompactCache):
    """A feature head's cache on CPU: its layer's keys and values, and the features its next feed reads."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.features_in: torch.Tensor | None = None  # [rows of the next feed, h]
        self.predicted: torch.Tensor | None = None  # [1, h]: the last position's predicted feature


class _FeatureInputs:
    """What makes a decoder a feature head: its feeds are token ids as any draft's, and the
    feature of each fed row is what the drafter left in the cache's `features_in` (the
    target's, or the head's own last prediction, `predicted`). Mixed into the CPU decoder
    (FeatureDecoder) and the GPU's graph decoder (GraphFeatureDecoder)."""

    reads_features = True  # only drafters/feature.py can drive it (engine.py checks)

    def _attach(self, head: FeatureHead, target: CausalLM, token_map: torch.Tensor) -> None:
        self.head = head
        self._target = target
        self._one_row_step = None  # the native step reads token embeddings; this reads fc's rows
        self._fc = self._weight(head.fc.weight.detach())
        self.feature_size = int(head.fc.out_features)
        self.max_context = min(self.max_context, target.max_context)
        token_map = token_map.to(self.device)
        self._set_subset_head(token_map, target.head_rows(token_map).to(self.device))

    def renders_same_model(self, other: object) -> bool:
        return False  # its cache is its own layer's, never the target's

    def head_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._target.head_rows(token_ids)

    def input_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._target.input_embeddings(token_ids)

    def _fc_rows(self, token_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        embeddings = self._target.input_embeddings(token_ids).to(self.device)
        x = torch.cat([embeddings, features.to(embeddings.dtype)], dim=-1)
        return self._product(x.to(self.dtype), self._fc).to(embeddings.dtype)

    def _input_rows(self, token_ids: list[torch.Tensor], caches: list) -> torch.Tensor:
        features = []
        for ids, cache in zip(token_ids, caches):
            features.append(_take_features(cache, ids.shape[0]).to(self.device))
        return self._fc_rows(torch.cat(token_ids).to(self.device), torch.cat(features))

    def _packed_body(self, token_ids: list[torch.Tensor], caches: list) -> torch.Tensor:
        hidden = super()._packed_body(token_ids, caches)
        for cache, end in zip(caches, accumulate(t.shape[0] for t in token_ids)):
            cache.predicted = hidden[end - 1 : end]
        return hidden

    def flops_per_token(self) -> float:
        return super().flops_per_token() + 2.0 * self._fc.numel()


def _take_features(cache: Any, n: int) -> torch.Tensor:
    if cache.features_in is None or cache.features_in.shape[0] < n:
        raise RuntimeError("a feature head's feed needs a feature per row (drafters/feature.py sets them)")
    rows, cache.features_in = cache.features_in[:n], cache.features_in[n:]
    return rows


class FeatureDecoder(_FeatureInputs, CompactDecoder):
    """A feature head on the CPU's compact decoder (int8 weights where the target is float32)."""

    def __init__(self, head: FeatureHead, target: CausalLM, token_map: torch.Tensor, name: str,
                 int8: bool = False) -> None:
        device, dtype = target.device, getattr(target, "dtype", torch.float32)
        head = head.to(device, dtype)
        super().__init__(head.model, name, dtype, set(target.eos_token_ids), target.vocab_size,
                         int8_weights=int8 and dtype == torch.float32)
        self._attach(head, target, token_map)

    def new_cache(self) -> FeatureCache:
        return FeatureCache(len(self._layers), self._kv_heads, self._head_dim, self.dtype, self.device)


class GraphFeatureDecoder(_FeatureInputs, GraphDecoder):
    """A feature head on the GPU's graph decoder, beside a target that runs there. Its steps of
    up to GRAPH_MAX_TOKENS rows are captured graphs as the target's: the features are staged
    into the slot's buffer before the replay and the prediction is the graph's hidden-state
    output; a longer catch-up (a prompt) runs the packed pass. It never joins batched graphs,
    which read token embeddings."""

    def __init__(self, head: FeatureHead, target: GraphDecoder, token_map: torch.Tensor, name: str,
                 int8: bool = False) -> None:
        head = head.to(target.device, target.dtype)
        super().__init__(head.model, name, target.dtype, set(target.eos_token_ids), target.vocab_size,
                         capacity=target.capacity, kernels=target.kernels, int8_weights=int8)
        self._attach(head, target, token_map)

    def forward(self, token_ids: torch.Tensor, cache: Any, num_logits: int) -> torch.Tensor:
        logits = super().forward(token_ids, cache, num_logits)
        n = token_ids.shape[0]
        if self._graphs and n <= GRAPH_MAX_TOKENS:  # the step was a replay: _body did not run
            cache.predicted = cache.slot.hidden[n][n - 1 : n]
        return logits

    def _batchable(self, cache: Any, width: int) -> bool:
        return False

    def column_token_ids(self, cache: Any) -> torch.Tensor:
        return self.output_token_ids  # a fixed subset here: the graphs' head has fixed rows

    def _stage_inputs(self, cache: Any, n: int) -> None:
        self._slot_features(cache.slot)[:n].copy_(_take_features(cache, n))

    def _capture(self, slot: Any, n: int) -> None:
        self._slot_features(slot)
        super()._capture(slot, n)

    def _slot_features(self, slot: Any) -> torch.Tensor:
        if slot.features is None:
            slot.features = torch.zeros(GRAPH_MAX_TOKENS, self.feature_size, dtype=torch.float32, device=self.device)
        return slot.features

    def _static_inputs(self, token_ids: torch.Tensor, slot: Any) -> torch.Tensor:
        return self._fc_rows(token_ids, slot.features[: token_ids.shape[0]])

    @torch.inference_mode()
    def greedy_rollout(self, cache: Any, token: torch.Tensor, steps: int) -> torch.Tensor:
        """`steps` greedy draft steps after `token` [1] (a token id, on the device), each fed its
        own pick and the prediction before it (cache.predicted first): the drafter's rollout
        with nothing between the steps from the host. Per step, what the drafter would do
        after a one-token forward (the pick, its vocabulary id, staging the next step's token
        and feature) is inside one captured graph, replayed `steps` times, where it was five
        small launches around each replay: on an H200 (8B shape, k 6) the host issues a step's
        drafts in 0.54 ms instead of 0.82, which leaves it more room beside a server's work.
        Returns the picked token ids [steps], on the device."""
        self._check_room(cache, steps)
        slot = cache.slot
        self._rollout_buffers(slot)
        if self._graphs and slot.rollout_graph is None:
            slot.start.fill_(cache.length)  # the capture's warm-up runs write past the length
            self._capture_rollout(slot)
        slot.chain_input.copy_(token)
        slot.features[:1].copy_(cache.predicted)
        slot.start.fill_(cache.length)
        slot.rollout_at.zero_()
        for _ in range(steps):
            if self._graphs:
                slot.rollout_graph.replay()
            else:
                self._rollout_body(slot)
        cache.length += steps
        cache.predicted = slot.features[:1]
        return slot.rollout[:steps]

    def _rollout_buffers(self, slot: Any) -> None:
        self._slot_features(slot)
        if slot.rollout is None:
            slot.rollout = torch.zeros(MAX_DRAFT_TOKENS, dtype=torch.long, device=self.device)
            slot.rollout_at = torch.zeros(1, dtype=torch.long, device=self.device)

    def _rollout_body(self, slot: Any) -> None:
        """One rollout step: feed slot.chain_input with slot.features[0]; its pick (as a token
        id) becomes the next input and joins slot.rollout, its prediction the next feature."""
        hidden = self._static_body(slot.chain_input, slot)  # [1, h]
        token = self.output_token_ids[self._logits(hidden).argmax(dim=-1)]  # the argmax ModelDrafter._pick takes
        slot.rollout.index_copy_(0, slot.rollout_at, token)
        slot.rollout_at.add_(1)
        slot.chain_input.copy_(token)
        slot.features[:1].copy_(hidden)
        slot.start.add_(1)

    def _capture_rollout(self, slot: Any) -> None:
        start = slot.start.clone()  # warm-up runs advance it
        slot.rollout_graph = self._capture_graphs.captured(lambda: self._rollout_body(slot))
        slot.start.copy_(start)

    def _body(self, token_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        if token_ids.shape[0] > GRAPH_MAX_TOKENS:  # the packed pass reads features_in itself
            return self._packed_body([token_ids], [cache])
        self._stage_inputs(cache, token_ids.shape[0])
        hidden = super()._body(token_ids, cache)
        cache.predicted = hidden[-1:]
        return hidden


def teacher_of(features: torch.Tensor, head_rows: torch.Tensor) -> torch.Tensor:
    """The target's next-token log-probabilities over the subset head's tokens (renormalised there)."""
    with torch.no_grad():
        return (features @ head_rows.T).log_softmax(-1)


def feature_loss(predicted: torch.Tensor, features: torch.Tensor, teacher: torch.Tensor, head_rows: torch.Tensor,
                 regression_weight: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The training objective at one roll-out depth: KL(target || head) over the subset head's
    tokens plus a scale-free smooth-L1 on the features. predicted, features: [..., h];
    teacher: teacher_of(features). Returns (loss, top-1 agreement over the subset)."""
    scale = features.pow(2).mean().sqrt().clamp_min(1e-6).detach()
    student = (predicted @ head_rows.T).log_softmax(-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
    regression = F.smooth_l1_loss(predicted / scale, features / scale)
    agreement = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    return kl + regression_weight * regression, agreement
