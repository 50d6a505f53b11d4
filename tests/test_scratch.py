import sys
from pathlib import Path

import pytest
import torch

from bayesprune import CostConfig, FitConfig, GateConfig, fit, gate
from bayesprune.core.fit import make_optimizer, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from scratch import gpt2_tokenizer, scratch_model  # noqa: E402  (the benchmark's own model and tokenizer)


def test_the_gpt2_bpe_encodes_as_gpt2_does():
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.decode(tokenizer("To be, or not to be")["input_ids"]) == "To be, or not to be"


def test_the_schedule_warms_up_then_decays_to_a_tenth_and_never_decays_the_guide():
    config = FitConfig(steps=20, warmup_steps=5, schedule="cosine", weight_decay=0.1, weights="joint")
    guide, weight = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer([guide], 0.05, [weight], config)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.1]
    rates = []
    for step in range(20):
        schedule(optimizer, step, config)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(0.01) and rates[4] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and rates[-1] == pytest.approx(0.05 * 0.1, rel=0.05)


def test_a_small_model_trains_from_scratch_with_its_gates():
    model = scratch_model(vocab_size=320, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
    sequences = torch.randint(0, 32, (16, 16), generator=torch.Generator().manual_seed(0))  # a small alphabet
    gated = gate(model, GateConfig(units=("head", "neuron")))
    result = fit(gated, sequences, FitConfig(steps=30, batch_size=8, weights="joint", weight_lr=3e-3,
                                             warmup_steps=3, schedule="cosine", weight_decay=0.01),
                 cost=CostConfig(zero_probability=0.5), progress=False)
    dense_losses = [r["nll"] for r in result.history if r["cost"] == 0]
    assert dense_losses[-1] < dense_losses[0] - 1.0, "the weights learn"
