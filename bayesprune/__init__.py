"""bayesprune: Bayesian structured pruning of Hugging Face causal language models."""

from .config import DataConfig, FitConfig, GateConfig, PriorConfig, RunConfig
from .data import load_documents, load_splits, split_documents, tokenize, windows
from .evaluate import model_size, perplexity
from .selection import ExtractionPlan, LayerPlan, ModelTotals, Target, TargetError, choose
from .fit import Fit, fit
from .model import NonFiniteLossError
from .gates import GatedModel, gate
from .loading import load_pruned
from .models import load_model
from .posterior import GatePosterior
from .slicing import extract, extract_model, extract_streaming, save_extracted

__all__ = [
    "DataConfig", "FitConfig", "GateConfig", "PriorConfig", "RunConfig",
    "load_documents", "load_splits", "split_documents", "tokenize", "windows",
    "model_size", "perplexity",
    "ExtractionPlan", "LayerPlan", "ModelTotals", "Target", "TargetError", "choose",
    "extract", "extract_model", "extract_streaming", "save_extracted", "load_pruned",
    "Fit", "NonFiniteLossError", "fit",
    "GatedModel", "gate", "load_model", "GatePosterior",
]
