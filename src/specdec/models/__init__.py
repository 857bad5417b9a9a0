"""Model backends: one interface (`CausalLM`) for whatever runs the forward passes."""
from .base import CausalLM
from .loading import LoadedModel, load_model, resolve_device, resolve_dtype

__all__ = ["CausalLM", "LoadedModel", "load_model", "resolve_device", "resolve_dtype"]
