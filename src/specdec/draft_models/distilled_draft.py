"""A distilled draft: a shallow copy of the target's architecture, stored as an ordinary directory.

The draft keeps the target's hidden size so that it can use the target's own embedding
table and output head in memory: the directory holds only what the draft adds (its few
layers and final norm), which keeps a Gemma 3 270M draft near 20 MB instead of the
335 MB its 262k-token embedding alone would take. Its head scores only the tokens of its
token map (the most frequent tokens of its training text); draft probability zero
elsewhere is handled losslessly by the verify rule.

Directory layout:
  config.json         the transformers config of the draft (the target's, fewer layers)
  model.safetensors   layer and final-norm weights (bfloat16, or int8 rows with scales)
  token_map.json      the token id of each head row
  specdec_draft.json  what the draft was distilled from and how (checked at load)
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends.compact_decoder import CompactDecoder, UnsupportedArchitecture
from ..backends.hf import HFCausalLM
from ..errors import ModelLoadError, SpecDecError, VocabularyMismatchError

log = logging.getLogger("specdec")

FORMAT = 1
META_FILE = "specdec_draft.json"
TOKEN_MAP_FILE = "token_map.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class TargetIdentity:
    """What a draft must agree with: the same vocabulary, hidden size and family."""

    model_type: str
    vocab_size: int
    hidden_size: int
    vocabulary_key: str | None  # a digest of the tokenizer's vocabulary, when there is one

    @classmethod
    def of(cls, module: nn.Module, vocab_size: int, tokenizer: Any | None) -> "TargetIdentity":
        config = module.config.get_text_config()
        key = None
        if tokenizer is not None:
            from .token_frequency import vocabulary_key

            key = vocabulary_key(tokenizer)
        return cls(str(config.model_type), int(vocab_size), int(config.hidden_size), key)


def is_distilled_draft(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def initial_layers(target_layers: int, layers: int) -> list[int]:
    """Which target layers a draft of `layers` layers starts from: the first ones, and the
    last, whose output already speaks the head's language."""
    if not 1 <= layers <= target_layers:
        raise ValueError(f"a draft needs 1 to {target_layers} layers (the target's count), got {layers}")
    if layers == 1:
        return [0]
    return list(range(layers - 1)) + [target_layers - 1]


def build_draft_module(target: nn.Module, layer_ids: list[int]) -> nn.Module:
    """A `transformers` model of the target's class with the target's layers `layer_ids`
    (copied: they will be trained) and its embedding and head (shared: they stay frozen)."""
    config = _draft_config(target.config, layer_ids)
    draft = _empty_module(type(target), config)
    body, target_body = body_of(draft), body_of(target)
    for i, j in enumerate(layer_ids):
        draft_layer = body.layers[i]
        draft_layer.load_state_dict(target_body.layers[j].state_dict())
    body.norm.load_state_dict(target_body.norm.state_dict())
    draft.to(device=target.get_input_embeddings().weight.device, dtype=target.get_input_embeddings().weight.dtype)
    _share_vocabulary_modules(draft, target)
    return draft


def trained_state(draft: nn.Module, shared_layers: int = 0) -> dict[str, torch.Tensor]:
    """What distillation changes (the layers after the first `shared_layers`, which stay the
    target's own, and the final norm), keyed relative to the decoder body."""
    shared = tuple(f"layers.{i}." for i in range(shared_layers))
    return {name: tensor for name, tensor in body_of(draft).state_dict().items()
            if name.startswith(("layers.", "norm.")) and not name.startswith(shared)}


def trainable_parameters(draft: nn.Module, shared_layers: int = 0) -> list[nn.Parameter]:
    body = body_of(draft)
    return [p for module in (*body.layers[shared_layers:], body.norm) for p in module.parameters()]


def check_shared_layers(shared_layers: int, layers: int) -> None:
    if not 0 <= shared_layers < layers:
        raise SpecDecError(f"--shared-layers {shared_layers}: a draft of {layers} layers can share 0 to "
                           f"{layers - 1} of them with the target (at least one layer is trained)")


def layer_fingerprint(layer: nn.Module) -> float:
    """A coarse digest of a layer's weights (the sum of their magnitudes): the same for the
    same weights in any precision, to a relative 1e-3, and far apart for other weights."""
    return float(sum(t.detach().double().abs().sum() for t in layer.state_dict().values()))


STORAGE = ("bfloat16", "int8")
SCALE_SUFFIX = ".row_scale"


def save_draft(directory: Path, draft: nn.Module, token_map: torch.Tensor, identity: TargetIdentity,
               details: dict[str, Any], storage: str = "bfloat16", shared_layers: int = 0) -> None:
    """storage: "bfloat16", or "int8" (matrices as int8 rows with one float scale each: half
    the bytes on disk, dequantized at load; the target still verifies every token).
    shared_layers: the draft's first layers are the target's own, untrained; the directory
    names them (and their fingerprints, checked at load) instead of storing them."""
    from safetensors.torch import save_file

    if storage not in STORAGE:
        raise ValueError(f"unknown draft storage {storage!r}: choose one of {', '.join(STORAGE)}")
    directory.mkdir(parents=True, exist_ok=True)
    prefix = draft.base_model_prefix
    state = {f"{prefix}.{name}": tensor for name, tensor in trained_state(draft, shared_layers).items()}
    save_file(stored_weights(state, storage), str(directory / WEIGHTS_FILE))
    draft.config.save_pretrained(directory)
    (directory / TOKEN_MAP_FILE).write_text(json.dumps(token_map.tolist()))
    meta = {"format": FORMAT, "kind": "distilled", "target": identity.__dict__, "token_map_size": len(token_map),
            **details}
    if shared_layers:
        meta["shared_layers"] = shared_layers
        meta["shared_layer_fingerprints"] = [layer_fingerprint(layer)
                                             for layer in body_of(draft).layers[:shared_layers]]
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def stored_weights(state: dict[str, torch.Tensor], storage: str) -> dict[str, torch.Tensor]:
    """Tensors as a draft directory stores them: bfloat16, or (storage "int8") matrices as int8
    rows with a float scale each under NAME + SCALE_SUFFIX (`_dequantized` reverses it)."""
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if storage == "int8" and tensor.dim() == 2:
            scale = tensor.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            weights[name] = torch.round(tensor / scale).to(torch.int8).contiguous()
            weights[name + SCALE_SUFFIX] = scale.squeeze(1).contiguous()
        else:
            weights[name] = tensor.to(torch.bfloat16).contiguous()
    return weights


def load_distilled_draft(directory: str | Path, target: HFCausalLM, tokenizer: Any | None,
                         dtype: torch.dtype = torch.bfloat16) -> CompactDecoder | HFCausalLM:
    """The draft in `directory`, attached to `target`'s embedding and head. On CPU it runs
    on the compact decoder: a draft stored in int8 beside a float32 target keeps int8 weights
    there (the native one-token step: a 4-layer Gemma 3 draft step went from ~9 ms in bfloat16
    PyTorch ops to ~2 ms), any other with `dtype` weights (bfloat16: half the bytes of float32,
    and the faster on the CPUs measured); elsewhere it runs through transformers in the
    target's dtype."""
    directory = Path(directory)
    meta = _read_meta(directory)
    identity = TargetIdentity.of(target.model, target.vocab_size, tokenizer)
    _check_identity(directory, meta["target"], identity)
    token_map = _read_token_map(directory, target.vocab_size)
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    module = _empty_module(type(target.model), config)
    try:
        weights = load_file(str(directory / WEIGHTS_FILE))
    except Exception as exc:  # OSError, or safetensors' own error type for a damaged file
        raise ModelLoadError(f"cannot read the draft's weights in {directory}: {exc}") from None
    stored_int8 = any(name.endswith(SCALE_SUFFIX) for name in weights)
    missing, unexpected = module.load_state_dict(_dequantized(weights), strict=False)
    shared = _share_target_layers(directory, meta, module, target.model)
    body_missing = [k for k in missing if (".layers." in k or ".norm." in k)
                    and not any(f".layers.{i}." in k for i in range(shared))]
    if body_missing or unexpected:
        raise ModelLoadError(f"the draft in {directory} does not match its config "
                             f"(missing {body_missing[:3]}, unexpected {unexpected[:3]})")
    module.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False)
    _share_vocabulary_modules(module, target.model)
    name = f"distilled draft {directory.name} ({config.num_hidden_layers} layers, {len(token_map)} tokens)"
    eos = set(target.eos_token_ids)
    if target.device.type == "cpu":
        try:
            int8 = stored_int8 and target.dtype == torch.float32
            return CompactDecoder(module, name, torch.float32 if int8 else dtype, eos, target.vocab_size,
                                  token_map.to(target.device), int8_weights=int8)
        except UnsupportedArchitecture as exc:
            log.info("%s; the distilled draft runs through transformers instead", exc)
    head = target.model.get_output_embeddings()
    subset = nn.Linear(head.weight.shape[1], len(token_map), bias=getattr(head, "bias", None) is not None,
                       device=target.device, dtype=target.dtype)
    with torch.no_grad():
        subset.weight.copy_(head.weight[token_map.to(target.device)])
        if subset.bias is not None:
            subset.bias.copy_(head.bias[token_map.to(target.device)])
    module.set_output_embeddings(subset.requires_grad_(False))
    return HFCausalLM(module, name, eos_token_ids=eos, output_token_ids=token_map, vocab_size=target.vocab_size)


# ---- internals ---------------------------------------------------------------------------------

def _draft_config(target_config: Any, layer_ids: list[int]) -> Any:
    config = copy.deepcopy(target_config)
    text = config.get_text_config()
    text.num_hidden_layers = len(layer_ids)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text.layer_types[j] for j in layer_ids]
    return config


def _empty_module(cls: type, config: Any) -> nn.Module:
    """The model class built without its vocabulary-sized tables (they come from the target)."""
    build = copy.deepcopy(config)
    text = build.get_text_config()
    text.vocab_size = 1
    text.pad_token_id = None
    module = cls(build)
    module.config = config  # what save_pretrained writes: the real vocabulary size
    return module


def body_of(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def _share_vocabulary_modules(draft: nn.Module, target: nn.Module) -> None:
    draft.set_input_embeddings(target.get_input_embeddings())
    draft.set_output_embeddings(target.get_output_embeddings())


def _share_target_layers(directory: Path, meta: dict[str, Any], draft: nn.Module, target: nn.Module) -> int:
    """Put the target's own layers in the draft's first `shared_layers` places (they are not
    stored in the directory), after checking that they are the layers it was distilled on."""
    shared = meta.get("shared_layers", 0)
    if not shared:
        return 0
    layer_ids = meta.get("layers_from_target")
    recorded = meta.get("shared_layer_fingerprints")
    target_layers = body_of(target).layers
    if (not isinstance(shared, int) or not isinstance(layer_ids, list) or not isinstance(recorded, list)
            or layer_ids[:shared] != list(range(shared)) or len(recorded) != shared or shared > len(target_layers)):
        raise ModelLoadError(f"{directory}/{META_FILE} names {shared} shared layers but not which, or not "
                             "all of their fingerprints; distil the draft again")
    for i, j in enumerate(layer_ids[:shared]):
        actual = layer_fingerprint(target_layers[j])
        if abs(actual - recorded[i]) > 1e-3 * max(abs(recorded[i]), 1e-12):
            raise VocabularyMismatchError(
                f"the draft in {directory} runs on top of its target's layer {j}, and this target's layer {j} "
                "has other weights: it was distilled for another model of the same family. Distil a draft "
                "for this target with specdec distill")
        # The module itself, not a copy: the target's weights are in memory once. Its position
        # is the same in both (shared layers are the target's first), so is its cache index.
        body_of(draft).layers[i] = target_layers[j]
    return shared


def _dequantized(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in weights.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = weights.get(name + SCALE_SUFFIX)
        out[name] = tensor.float() * scale[:, None] if scale is not None else tensor
    return out


def _read_meta(directory: Path) -> dict[str, Any]:
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{directory} is not a specdec distilled draft ({META_FILE}: {exc})") from None
    if meta.get("format") != FORMAT or meta.get("kind") != "distilled" or "target" not in meta:
        raise ModelLoadError(f"{directory}/{META_FILE} is of an unknown format; distil the draft again")
    return meta


def identity_mismatches(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """How the target a draft was made for (`recorded`) differs from this one (`actual`): each of
    actual's fields as is, the vocabulary key only where both have one (no tokenizer: no key)."""
    problems = [f"{name} {recorded.get(name)!r} (target: {value!r})" for name, value in actual.items()
                if name != "vocabulary_key" and recorded.get(name) != value]
    key = actual.get("vocabulary_key")
    if recorded.get("vocabulary_key") and key and recorded["vocabulary_key"] != key:
        problems.append("a different tokenizer vocabulary")
    return problems


def _check_identity(directory: Path, recorded: dict[str, Any], actual: TargetIdentity) -> None:
    if problems := identity_mismatches(recorded, asdict(actual)):
        raise VocabularyMismatchError(f"the draft in {directory} was distilled for another target: "
                                      + "; ".join(problems) + ". Distil a draft for this target with specdec distill")


def _read_token_map(directory: Path, vocab_size: int) -> torch.Tensor:
    try:
        ids = json.loads((directory / TOKEN_MAP_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the draft's token map {directory / TOKEN_MAP_FILE}: {exc}") from None
    token_map = torch.tensor(ids, dtype=torch.long) if isinstance(ids, list) and ids else None
    if token_map is None or token_map.dim() != 1:
        raise ModelLoadError(f"{directory / TOKEN_MAP_FILE} must be a non-empty list of token ids")
    if int(token_map.min()) < 0 or int(token_map.max()) >= vocab_size or token_map.unique().numel() != len(token_map):
        raise VocabularyMismatchError(f"the token map in {directory} does not fit the target's vocabulary of "
                                      f"{vocab_size} tokens (ids out of range or repeated)")
    return token_map
