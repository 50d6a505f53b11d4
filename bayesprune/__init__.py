"""bayesprune: Bayesian structured pruning of Hugging Face causal language models.

The common case is one call, :func:`prune`. The steps it takes, in the order of the data
flow: configs; inputs (a model, a corpus cut into token windows); the core (gate the model,
fit the posterior); cutting a smaller model; judging it. Applications live in their
subpackages: :mod:`bayesprune.routing` (prompt-routed depth), :mod:`bayesprune.speculative`
(drafts for assisted generation), :mod:`bayesprune.baselines`; the jobs of the command line
in :mod:`bayesprune.run`.
"""

from .core.config import CostConfig, DataConfig, ExtractionConfig, FitConfig, GateConfig, PriorConfig, RunConfig
from .inputs.data import load_splits, tokenize, windows
from .inputs.pretrained import load_model
from .core.gates import gate
from .core.fit import fit
from .core.posterior import GatePosterior
from .core.targets import ModelTotals
from .prune import prune
from .cut.extraction import extract, extract_model, save_extracted
from .inputs.pruned import load_pruned
from .evaluation.perplexity import model_size, perplexity
from . import baselines, routing, speculative

__all__ = [
    "CostConfig", "DataConfig", "ExtractionConfig", "FitConfig", "GateConfig", "PriorConfig", "RunConfig",
    "load_model", "load_splits", "tokenize", "windows",
    "gate", "fit", "GatePosterior", "ModelTotals",
    "prune",
    "extract", "extract_model", "save_extracted", "load_pruned",
    "model_size", "perplexity",
    "baselines", "routing", "speculative",
]
