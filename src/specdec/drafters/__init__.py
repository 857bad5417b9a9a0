"""Drafters propose tokens for the target to verify. One drafter per file."""
from .base import Drafter, DrafterFactory, DraftProposal
from .model import ModelDrafter
from .ngram import NGramDrafter

__all__ = ["DraftProposal", "Drafter", "DrafterFactory", "ModelDrafter", "NGramDrafter"]
