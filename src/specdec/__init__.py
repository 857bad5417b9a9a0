"""specdec: lossless speculative decoding. A draft proposes, the target verifies every token."""
from .api import load
from .engine import Engine
from .errors import InvalidRequestError, ModelLoadError, SpecDecError, VocabularyMismatchError
from .generation import Generation, GenerationOutput, StepOutput
from .sampling_params import SamplingParams
from .stats import GenerationStats

__all__ = [
    "load", "Engine", "Generation", "GenerationOutput", "StepOutput", "GenerationStats", "SamplingParams",
    "SpecDecError", "InvalidRequestError", "ModelLoadError", "VocabularyMismatchError",
]
__version__ = "0.1.0"
