"""Prompt-routed depth: candidate sets of blocks to skip and a Bayesian router that picks one per prompt."""

from .router import BayesianRouter
from .routed import (RoutedModel, candidate_losses, candidate_sets, domain_block_posteriors, fit_routed_model,
                     held_out_check, route_prompts)

__all__ = ["BayesianRouter", "RoutedModel", "candidate_losses", "candidate_sets", "domain_block_posteriors",
           "fit_routed_model", "held_out_check", "route_prompts"]
