"""Evaluation: perplexity in the GPTQ convention."""

from .perplexity import perplexity

__all__ = ["perplexity"]
