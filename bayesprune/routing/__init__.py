"""Prompt-routed depth: candidate sets of blocks to skip and a Bayesian router that picks one per prompt."""
