"""bayesprune: Bayesian structured pruning of Hugging Face causal language models.

The public API, in the order of the data flow: configs; inputs; the core (gate, fit, posterior);
the common case in one call (prune); cutting; evaluation; speculative drafts; prompt routing.
"""

from .core.config import (CostConfig, DataConfig, DepthConfig, DraftConfig, ExtractionConfig, FitConfig, GateConfig,
                          PriorConfig, RouterConfig, RunConfig)
from .inputs.data import domain_documents, load_documents, load_splits, split_documents, tokenize, windows
from .inputs.pretrained import load_model
from .inputs.pruned import load_pruned
from .core.gates import GatedModel, gate
from .core.fit import Fit, fit
from .core.model import NonFiniteLossError, ShrinkagePrior
from .core.posterior import GatePosterior, cost_grid
from .core.plan import ExtractionPlan, LayerPlan
from .core.targets import ModelTotals, Target, TargetError
from .core.sizes import UnitSizes
from .prune import Pruned, prune
from .cut.extraction import extract, extract_model, extract_streaming, save_extracted
from .evaluation.perplexity import model_size, perplexity
from .speculative.decoding import count_acceptance, direct_drafting, expected_speedup, skip_blocks, trim_vocabulary
from .run.drafts import load_draft, rank_drafts, self_draft, write_draft
from .routing.router import BayesianRouter
from .routing.routed import (RoutedModel, candidate_losses, candidate_sets, domain_block_posteriors, fit_routed_model,
                             held_out_check, route_prompts)

__all__ = [
    "CostConfig", "DataConfig", "DepthConfig", "DraftConfig", "ExtractionConfig", "FitConfig", "GateConfig",
    "PriorConfig", "RouterConfig", "RunConfig",
    "domain_documents", "load_documents", "load_splits", "split_documents", "tokenize", "windows",
    "load_model", "load_pruned",
    "GatedModel", "gate", "Fit", "fit", "NonFiniteLossError", "ShrinkagePrior", "GatePosterior", "cost_grid",
    "ExtractionPlan", "LayerPlan", "ModelTotals", "Target", "TargetError", "UnitSizes",
    "Pruned", "prune",
    "extract", "extract_model", "extract_streaming", "save_extracted",
    "model_size", "perplexity",
    "count_acceptance", "direct_drafting", "expected_speedup", "skip_blocks", "trim_vocabulary",
    "load_draft", "rank_drafts", "self_draft", "write_draft",
    "BayesianRouter", "RoutedModel", "candidate_losses", "candidate_sets", "domain_block_posteriors",
    "fit_routed_model", "held_out_check", "route_prompts",
]
