import math

import pytest
import torch

from bayesprune import CostConfig, FitConfig, GateConfig, fit, gate
from bayesprune.core.likelihood import sequence_nll
from bayesprune.evaluation.prediction import ensemble_nll, plan_quality, predicted_quality, sampled_log_probs
from tests.conftest import VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
VALIDATION = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def fitted():
    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    result = fit(gated, SEQUENCES, FitConfig(steps=20, batch_size=4, guide_lr=0.1),
                 cost=CostConfig(zero_probability=0.0, rate=0.5), progress=False)
    return gated, result.posterior()


def test_at_cost_zero_every_sample_is_the_dense_model_and_the_band_is_the_data_noise(fitted):
    gated, curve = fitted
    with torch.no_grad():
        dense = (sequence_nll(gated, VALIDATION).sum() / VALIDATION[:, 1:].numel()).item()
    row = predicted_quality(gated, curve, VALIDATION, [0.0], num_masks=3, progress=False)[0]
    assert row["fraction"] == 1.0 and row["nll"] == pytest.approx(dense, rel=1e-5)
    assert row["perplexity_low"] <= math.exp(dense) <= row["perplexity_high"]
    assert all(p == pytest.approx(math.exp(dense), rel=1e-5) for p in row["mask_perplexities"])


def test_sampled_sub_networks_differ_and_are_reproducible(fitted):
    gated, curve = fitted
    a, fa = sampled_log_probs(gated, curve, VALIDATION, 2.0, num_masks=4, seed=3)
    b, fb = sampled_log_probs(gated, curve, VALIDATION, 2.0, num_masks=4, seed=3)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert a.shape == (4, 6, 11) and (fa < 1).all()


def test_the_ensemble_is_never_worse_than_its_average_member(fitted):
    gated, curve = fitted
    result = ensemble_nll(gated, curve, VALIDATION, 2.0, num_masks=4)
    assert result["ensemble_nll"] < result["mean_member_nll"]  # Jensen, strict: the members differ
    assert len(result["member_nll"]) == 4


def test_a_plans_predicted_quality_is_what_its_extracted_model_scores(fitted):
    from bayesprune import ModelTotals, extract_model

    gated, curve = fitted
    with gated.unwrapped() as model:
        totals = ModelTotals.of(model)
        plan = curve.plan("0.6", totals)
        small = extract_model(model, plan)
    row = plan_quality(gated, plan, curve.amplitudes(plan.cost, point=True), VALIDATION)
    with torch.no_grad():
        measured = (sequence_nll(small, VALIDATION).sum() / VALIDATION[:, 1:].numel()).item()
    assert row["nll"] == pytest.approx(measured, rel=1e-4)
    assert row["perplexity_low"] <= row["perplexity"] <= row["perplexity_high"]
