"""bayesprune: Bayesian structured pruning of Hugging Face causal language models."""

from .core.config import CostConfig, DataConfig, ExtractionConfig, FitConfig, GateConfig, PriorConfig, RouterConfig, RunConfig
from .inputs.data import domain_documents, load_documents, load_splits, split_documents, tokenize, windows
from .evaluation.perplexity import model_size, perplexity
from .core.fit import Fit, fit
from .prune import Pruned, prune
from .core.gates import GatedModel, gate
from .inputs.pruned import load_pruned
from .core.model import NonFiniteLossError, ShrinkagePrior
from .inputs.pretrained import load_model
from .core.posterior import GatePosterior, cost_grid
from .core.plan import ExtractionPlan, LayerPlan
from .core.targets import ModelTotals, Target, TargetError
from .core.sizes import UnitSizes
from .cut.extraction import extract, extract_model, extract_streaming, save_extracted
from .speculative.decoding import count_acceptance, direct_drafting, expected_speedup, skip_blocks, trim_vocabulary
from .run.drafts import load_draft, rank_drafts, self_draft, write_draft
from .routing.router import BayesianRouter
from .routing.routed import RoutedModel, candidate_losses, candidate_sets, domain_block_posteriors, fit_routed_model, held_out_check, route_prompts

__all__ = [
    "CostConfig", "DataConfig", "ExtractionConfig", "FitConfig", "GateConfig", "PriorConfig", "RouterConfig", "RunConfig",
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
