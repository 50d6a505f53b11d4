"""``bp.prune``: the common case in one call, the same as the steps it stands for."""

import pytest
import torch

import bayesprune as bp
from bayesprune.core.adapters import merge_checkpoint_adapters
from bayesprune.cut.recovery import recover_cut
from bayesprune.inputs.data import Document
from tests.conftest import tiny_model

CONFIG = bp.FitConfig(steps=3, batch_size=2, seq_len=32, seed=0)


def _text(corpus_dir) -> list[str]:
    return [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]


@pytest.mark.parametrize("likelihood", ["nll", "distillation"])
def test_prune_is_gate_fit_and_extract_in_one_call(tokenizer, corpus_dir, likelihood):
    result = bp.prune(tiny_model("llama"), _text(corpus_dir), "0.6", tokenizer=tokenizer, config=CONFIG,
                      recovery_likelihood=likelihood, progress=False)

    model = tiny_model("llama")  # the same steps by hand give the same sub-network, tensor for tensor
    sequences = bp.windows(bp.tokenize(tokenizer, [Document(f"document {i}", t)
                                                   for i, t in enumerate(_text(corpus_dir))]), CONFIG.seq_len)
    gated = bp.gate(model, bp.GateConfig())
    by_hand = bp.fit(gated, sequences, CONFIG, progress=False)
    network = gated.remove()  # adapters merged whole, then taken back to the default share (half)
    whole = {k: v.clone() for k, v in network.state_dict().items()}
    merge_checkpoint_adapters(network, by_hand.adapters, CONFIG.lora_scale * (bp.ExtractionConfig().adapter_share - 1))
    assert all(torch.equal(network.state_dict()[k], v) for k, v in result.network.state_dict().items())
    assert any(not torch.allclose(whole[k], v) for k, v in result.network.state_dict().items())
    small, plan = bp.extract(network, by_hand.posterior(), "0.6")
    assert plan.record() == result.plan.record()
    untuned = {k: v.clone() for k, v in small.state_dict().items()}
    small, recovery = recover_cut(small, sequences.flatten(), bp.ExtractionConfig(recovery_likelihood=likelihood),
                                  CONFIG.seq_len, plan.fraction, lambda: tiny_model("llama"),  # then fine-tuned on
                                  progress=False)  # the same windows, towards the model as it came in where it distils
    assert recovery["steps"] == max(50, round(200 * (1 - plan.fraction)))  # by the cut
    assert any(not torch.equal(untuned[k], v) for k, v in small.state_dict().items())
    expected = small.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in result.model.state_dict().items())

    assert result.plan.fraction <= 0.6 and sum(p.numel() for p in result.model.parameters()) < \
        sum(p.numel() for p in result.network.parameters())
    other, _ = bp.extract(result.network, result.posterior, "0.8")  # any other size, no recovery
    assert sum(p.numel() for p in other.parameters()) > sum(p.numel() for p in result.model.parameters())


def test_prune_keeps_the_chain_whose_cut_at_the_target_reads_best():
    from bayesprune.evaluation.prediction import plan_quality

    windows = torch.randint(0, 320, (24, 32), generator=torch.Generator().manual_seed(0))
    config = bp.FitConfig(steps=3, batch_size=2, seq_len=32, seed=0, chains=3)
    result = bp.prune(tiny_model("llama"), windows, "0.6", config=config, progress=False)
    scores = [c["score"] for c in result.fit.chains]
    assert result.fit.chain == scores.index(min(scores)) and len(set(scores)) == 3
    totals = bp.ModelTotals.of(tiny_model("llama"))
    for chain in range(3):  # each chain's score is its own cut's NLL on the first 16 windows
        alone = bp.fit(bp.gate(tiny_model("llama"), bp.GateConfig()), windows,
                       bp.FitConfig(steps=3, batch_size=2, seq_len=32, seed=chain), progress=False)
        with alone.gated.unwrapped() as plain:  # the adapters at the share the cut merges
            merge_checkpoint_adapters(plain, alone.adapters, config.lora_scale * (bp.ExtractionConfig().adapter_share - 1))
        posterior = alone.posterior()
        plan = posterior.plan("0.6", totals)
        predicted = plan_quality(alone.gated, plan, posterior.amplitudes(plan.cost, point=True), windows[:16])
        assert predicted["nll"] == pytest.approx(scores[chain], rel=1e-5), chain


def test_prune_takes_windows_and_refuses_what_it_cannot_do_before_fitting(tokenizer):
    windows = torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(0))
    result = bp.prune(tiny_model("llama"), windows, "3layers", units=["block"], config=CONFIG, progress=False)
    assert result.model.config.num_hidden_layers == 3

    model = tiny_model("llama")
    with pytest.raises(bp.core.targets.TargetError, match="needs block, attn or mlp gates"):
        bp.prune(model, windows, "3layers", units=["head", "neuron"], config=CONFIG)
    with pytest.raises(ValueError, match="tokenizer"):
        bp.prune(model, "To be, or not to be", "0.5", config=CONFIG)
    with pytest.raises(ValueError, match="longer than the model's 256 positions"):
        bp.prune(model, torch.zeros(2, 300, dtype=torch.long), "0.5", config=CONFIG)
    with pytest.raises(ValueError, match="token ids"):
        bp.prune(model, torch.zeros(2, 8), "0.5", config=CONFIG)
    with pytest.raises(ValueError, match="adapter_share must be between 0 and 1"):
        bp.prune(model, windows, "0.5", config=CONFIG, adapter_share=1.5)
    with pytest.raises(ValueError, match="recovery_steps must be an integer >= 0"):
        bp.prune(model, windows, "0.5", config=CONFIG, recovery_steps=-3)
    with pytest.raises(ValueError, match="recovery_likelihood must be one of"):
        bp.prune(model, windows, "0.5", config=CONFIG, recovery_likelihood="kl")
    assert [type(m) for m in model.modules()] == [type(m) for m in tiny_model("llama").modules()]  # not gated
