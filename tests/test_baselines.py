import pytest
import torch
import torch.nn.functional as F

from bayesprune import extract_model
from bayesprune.core.architectures import decoder_layers
from bayesprune.baselines import (baseline_plan, block_influence, drop_last_scores,
                                  magnitude_plan, magnitude_scores, random_scores, run_block_baseline, sleb_scores)
from bayesprune.core.likelihood import calibration_nll
from tests.conftest import VOCAB, tiny_model

WINDOWS = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(0))


def with_identity_block(family: str, index: int):
    """A tiny model whose block ``index`` adds nothing to the residual stream."""
    model = tiny_model(family)
    block = decoder_layers(model)[index]
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "attn.c_proj.weight", "mlp.c_proj.weight")) \
                    or (name.endswith("c_proj.bias")):
                p.zero_()
    return model


def test_block_influence_is_one_minus_the_mean_cosine_of_block_input_and_output():
    model = tiny_model("llama")
    bi = block_influence(model, WINDOWS, batch_size=4)
    with torch.no_grad():
        hidden = model(input_ids=WINDOWS, output_hidden_states=True).hidden_states
    for layer in range(3):  # the last entry of hidden_states is after the final norm
        expected = 1 - F.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1).double().mean()
        assert bi[layer].item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_identity_block_has_no_influence_and_goes_first(family):
    model = with_identity_block(family, 2)
    bi = block_influence(model, WINDOWS)
    assert bi[2].item() == pytest.approx(0.0, abs=1e-6) and (bi[[0, 1, 3]] > 1e-3).all()
    assert baseline_plan(model, bi, "3layers").kept_layers == [0, 1, 3]


def test_sleb_removes_the_block_whose_removal_hurts_least_and_leaves_the_model_alone():
    model = tiny_model("llama")
    keys = list(model.state_dict())
    scores = sleb_scores(model, WINDOWS, num_remove=2, progress=False)
    assert list(model.state_dict()) == keys, "the search gates and un-gates the model"
    brute = {}
    for layer in range(4):
        small = extract_model(model, baseline_plan(model, torch.tensor([0.0 if i == layer else 1.0 for i in range(4)]),
                                                   "3layers"))
        brute[layer] = calibration_nll(small, WINDOWS)
    first = min(brute, key=brute.get)
    assert scores[first].item() == 0
    assert sorted(scores.tolist()) == [0.0, 1.0, 4.0, 4.0]


def test_random_and_drop_last_orders():
    assert torch.equal(random_scores(6, seed=3), random_scores(6, seed=3))
    assert sorted(random_scores(6, seed=3).tolist()) == list(range(6))
    assert not torch.equal(random_scores(6, seed=3), random_scores(6, seed=4))
    model = tiny_model("mistral")
    assert baseline_plan(model, drop_last_scores(4), "2layers").kept_layers == [0, 1]


def test_baseline_results_record_their_budget_and_fit_the_target():
    model = tiny_model("llama")
    result = run_block_baseline("shortgpt", model, "0.5", WINDOWS, progress=False)
    record = result.record()
    assert record["method"] == "shortgpt" and record["calibration_tokens"] == WINDOWS.numel()
    assert record["fraction_of_decoder"] <= 0.5 and len(record["kept_layers"]) == 2
    assert run_block_baseline("random", model, "0.5").record()["calibration_tokens"] == 0
    with pytest.raises(ValueError, match="calibration windows"):
        run_block_baseline("sleb", model, "0.5")
    with pytest.raises(ValueError, match="unknown baseline"):
        run_block_baseline("magic", model, "0.5", WINDOWS)


def test_magnitude_scores_are_the_norms_of_the_weights_cut_with_each_unit():
    model = tiny_model("llama")  # 2 KV groups of 2 query heads, head_dim 8; 48 neurons
    scores = magnitude_scores(model)
    attn, mlp = decoder_layers(model)[1].self_attn, decoder_layers(model)[1].mlp
    group = 1
    q = attn.q_proj.weight[group * 16:(group + 1) * 16]
    k, v = attn.k_proj.weight[group * 8:(group + 1) * 8], attn.v_proj.weight[group * 8:(group + 1) * 8]
    o = attn.o_proj.weight[:, group * 16:(group + 1) * 16]
    expected = torch.sqrt(sum((w.double() ** 2).sum() for w in (q, k, v, o)))
    assert scores["head"].shape == (4, 2) and scores["head"][1, group].item() == pytest.approx(expected.item())
    neuron = 7
    expected = torch.sqrt(sum((w.double() ** 2).sum() for w in (
        mlp.gate_proj.weight[neuron], mlp.up_proj.weight[neuron], mlp.down_proj.weight[:, neuron])))
    assert scores["neuron"].shape == (4, 48) and scores["neuron"][1, neuron].item() == pytest.approx(expected.item())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_magnitude_plan_drops_the_smallest_units_and_fits_the_target(family):
    model = tiny_model(family)
    mlp = decoder_layers(model)[2].mlp
    with torch.no_grad():
        if family == "gpt2":
            mlp.c_fc.weight[:, 5] *= 1e-3
            mlp.c_proj.weight[5] *= 1e-3
        else:
            for w in (mlp.gate_proj.weight[5], mlp.up_proj.weight[5], mlp.down_proj.weight[:, 5]):
                w *= 1e-3
    plan = magnitude_plan(model, "0.7")
    assert plan.form == "uniform" and plan.fraction <= 0.7 and len(plan.layers) == 4
    assert 5 not in plan.layers[2].kept("neuron")
    assert len({len(layer.kept("neuron")) for layer in plan.layers}) == 1
    small = extract_model(model, plan)
    with torch.no_grad():
        assert torch.isfinite(calibration_nll(small, WINDOWS) * torch.ones(1)).all()
