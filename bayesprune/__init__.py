"""bayesprune: Bayesian structured pruning of Hugging Face causal language models."""

from .config import CostConfig, DataConfig, ExtractionConfig, FitConfig, GateConfig, PriorConfig, RunConfig
from .data import domain_documents, load_documents, load_splits, split_documents, tokenize, windows
from .evaluate import model_size, perplexity
from .fit import Fit, fit
from .prune import Pruned, prune
from .gates import GatedModel, gate
from .pruned import load_pruned
from .model import NonFiniteLossError, ShrinkagePrior
from .pretrained import load_model
from .posterior import GatePosterior, cost_grid
from .plan import ExtractionPlan, LayerPlan
from .targets import ModelTotals, Target, TargetError
from .sizes import UnitSizes
from .extraction import extract, extract_model, extract_streaming, save_extracted
from .speculative import count_acceptance, direct_drafting, expected_speedup, skip_blocks, trim_vocabulary
from .drafts import load_draft, rank_drafts, self_draft, write_draft
from .router import BayesianRouter
from .routing import RoutedModel, candidate_losses, candidate_sets, domain_block_posteriors, fit_routed_model, held_out_check, route_prompts

__all__ = [
    "CostConfig", "DataConfig", "ExtractionConfig", "FitConfig", "GateConfig", "PriorConfig", "RunConfig",
    "domain_documents", "load_documents", "load_splits", "split_documents", "tokenize", "windows",
    "model_size", "perplexity",
    "ExtractionPlan", "LayerPlan", "ModelTotals", "Target", "TargetError", "UnitSizes",
    "extract", "extract_model", "extract_streaming", "save_extracted", "load_pruned",
    "Fit", "NonFiniteLossError", "ShrinkagePrior", "fit", "Pruned", "prune",
    "GatedModel", "gate", "load_model", "GatePosterior", "cost_grid",
    "count_acceptance", "direct_drafting", "expected_speedup", "skip_blocks", "trim_vocabulary",
    "load_draft", "rank_drafts", "self_draft", "write_draft",
    "BayesianRouter", "RoutedModel", "candidate_losses", "candidate_sets", "domain_block_posteriors", "fit_routed_model", "held_out_check",
    "route_prompts",
]
