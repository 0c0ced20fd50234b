"""Evaluation: perplexity in the GPTQ convention, and scores on the built-in verifiable tasks."""

from .perplexity import perplexity
from .tasks import evaluate_exact_match, heldout_loss

__all__ = ["evaluate_exact_match", "heldout_loss", "perplexity"]
