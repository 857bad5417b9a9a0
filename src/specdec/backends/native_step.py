"""The compact decoder's one-token step in native code (native/one_row_step.c), for int8 drafts.

Drafting runs one token at a time, and at that size a PyTorch layer is mostly dispatch: the
int8 self-draft of Gemma 3 270M spent as long in ~400 small ops per step as in its products.
This runs all layers of one step in one call. It applies where the decoder's matrices are
`Int8Weight`s with float32 activations on CPU, the activation is SiLU or tanh-GELU and the
native kernels are built; otherwise `one_row_step_for` returns None and the decoder keeps its
PyTorch path, which computes the same function (tests/backends/test_native_step.py compares them).
"""
from __future__ import annotations

import ctypes
import threading

import torch

from ..kernels import native_matmul
from .layers import Int8Weight, cos_sin

_ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1}


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "qkv", "o", "gate_up", "down", "qkv_scale", "o_scale", "gate_up_scale", "down_scale", "qkv_bias",
        "input_norm", "pre_mlp_norm", "q_norm", "k_norm", "post_attention_norm", "post_mlp_norm",
        "cos", "sin", "keys", "values")] + [("window", ctypes.c_int64), ("scaling", ctypes.c_float)]


class _Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in (
        "hidden", "heads", "kv_heads", "head_dim", "intermediate", "capacity")] + [
        ("eps", ctypes.c_float), ("activation", ctypes.c_int), ("threads", ctypes.c_int)]


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class OneRowStep:
    """decoder._body for one token: the residual stream after the last layer's norm, [1, hidden]."""

    def __init__(self, decoder, library: ctypes.CDLL, activation: int) -> None:

        self._decoder, self._library, self._cos_sin = decoder, library, cos_sin  # [1, 1, head_dim] each, contiguous
        self._lock = threading.Lock()  # the layer table below holds one call's cache pointers
        first = decoder._layers[0]
        self._shape = _Shape(hidden=first.gate_up.shape[1], heads=decoder._heads, kv_heads=decoder._kv_heads,
                             head_dim=decoder._head_dim, intermediate=first.gate_up.shape[0] // 2,
                             eps=decoder._eps, activation=activation)
        self._layers = (_Layer * len(decoder._layers))()
        for slot, layer in zip(self._layers, decoder._layers):
            for name in ("qkv", "o", "gate_up", "down"):
                weight = getattr(layer, name)
                setattr(slot, name, weight.data.data_ptr())
                setattr(slot, f"{name}_scale", weight.scale.data_ptr())
            for name in ("qkv_bias", "input_norm", "pre_mlp_norm", "q_norm", "k_norm", "post_attention_norm",
                         "post_mlp_norm"):
                setattr(slot, name, _pointer(getattr(layer, name)))
            slot.window, slot.scaling = layer.sliding_window or 0, layer.scaling

    def __call__(self, token_ids: torch.Tensor, cache) -> torch.Tensor:
        decoder, position = self._decoder, cache.length
        cache.reserve(position + 1)
        hidden = decoder.embedding(token_ids).float().contiguous()  # [1, hidden]
        positions = torch.tensor([position], dtype=torch.float32)
        rotary = [self._cos_sin(positions, inv_freq, scale) for inv_freq, scale in zip(decoder._inv_freq,
                                                                                      decoder._rope_scale)]
        with self._lock:
            for i, (slot, layer) in enumerate(zip(self._layers, decoder._layers)):
                cos, sin = rotary[layer.rope]
                slot.cos, slot.sin = cos.data_ptr(), sin.data_ptr()
                slot.keys, slot.values = cache.keys[i].data_ptr(), cache.values[i].data_ptr()
            self._shape.capacity = cache.keys[0].shape[1]
            self._shape.threads = torch.get_num_threads()
            status = self._library.one_row_step(ctypes.byref(self._layers), len(self._layers),
                                                ctypes.byref(self._shape), hidden.data_ptr(), position)
        if status != 0:
            raise MemoryError("the native draft step could not allocate its scratch memory")
        cache.length = position + 1
        return torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), decoder._final_norm, decoder._eps)


def one_row_step_for(decoder, activation_name: str) -> OneRowStep | None:
    """The native one-token step for `decoder`, or None where it does not apply."""

    activation = _ACTIVATIONS.get(activation_name)
    layers = decoder._layers
    if (activation is None or decoder.dtype != torch.float32 or decoder.device.type != "cpu"
            or decoder._heads % decoder._kv_heads or decoder._head_dim % 2
            or not all(isinstance(getattr(layer, name), Int8Weight)
                       for layer in layers for name in ("qkv", "o", "gate_up", "down"))):
        return None
    library = native_matmul.library()
    if library is None:
        return None
    return OneRowStep(decoder, library, activation)
