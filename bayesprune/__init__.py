"""bayesprune: Bayesian structured pruning of Hugging Face causal language models."""

from .config import DataConfig, FitConfig, GateConfig, PriorConfig, RunConfig
from .data import load_documents, load_splits, split_documents, tokenize, windows
from .evaluate import model_size, perplexity
from .extract import Target, TargetError, choose_layers, extract_layers, save_extracted
from .fit import Fit, fit
from .model import NonFiniteLossError
from .gates import GatedModel, gate
from .models import load_model
from .posterior import GatePosterior

__all__ = [
    "DataConfig", "FitConfig", "GateConfig", "PriorConfig", "RunConfig",
    "load_documents", "load_splits", "split_documents", "tokenize", "windows",
    "model_size", "perplexity",
    "Target", "TargetError", "choose_layers", "extract_layers", "save_extracted",
    "Fit", "NonFiniteLossError", "fit",
    "GatedModel", "gate", "load_model", "GatePosterior",
]
