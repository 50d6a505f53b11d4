"""Speculative decoding with pruned drafts through transformers' assisted generation."""
