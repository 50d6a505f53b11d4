"""Speculative decoding with pruned drafts through transformers' assisted generation."""

from .decoding import count_acceptance, direct_drafting, expected_speedup, skip_blocks, trim_vocabulary

__all__ = ["count_acceptance", "direct_drafting", "expected_speedup", "skip_blocks", "trim_vocabulary"]
