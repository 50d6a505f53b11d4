"""Fits of several chains: each chain is the one-chain fit of its seed, the posterior pools them on ArviZ's chain
dimension, R-hat and ESS read them, and the plan and extracted network are the selected chain's: with a target,
the chain whose cut at it predicts the lowest perplexity."""

import dataclasses
import json

import arviz as az
import numpy as np
import pytest
import torch

from bayesprune import ExtractionConfig, FitConfig, GateConfig, fit, gate
from bayesprune.core.fit import chain_checkpoint
from bayesprune.core.posterior import GatePosterior
from tests.conftest import VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (24, 12), generator=torch.Generator().manual_seed(0))
VALIDATION = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(1))


def run(chains=1, seed=0, weights="frozen", checkpoint=None, select=None, **kw):
    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    config = FitConfig(steps=3, batch_size=4, seq_len=12, weights=weights, chains=chains, seed=seed,
                       checkpoint_every=2, posterior_draws=30, **kw)
    return fit(gated, SEQUENCES, config, checkpoint=checkpoint, progress=False, validation=VALIDATION, select=select)


def test_each_chain_is_the_one_chain_fit_of_its_seed_and_the_posterior_pools_them():
    chained = run(chains=3, seed=5)
    assert [c["seed"] for c in chained.chains] == [5, 6, 7] and len(chained.guides) == 3
    for chain, seed in enumerate((5, 6, 7)):
        single = run(seed=seed)
        for key, value in single.guide.state_dict().items():
            assert torch.equal(chained.guides[chain].state_dict()[key], value), (chain, key)
    losses = [c["validation_loss"] for c in chained.chains]
    assert chained.chain == losses.index(min(losses))
    posterior = chained.posterior()
    assert posterior.num_chains == 3 and posterior.chain == chained.chain
    pooled = run(seed=5).posterior().pooled([run(seed=6).posterior(), run(seed=7).posterior()], chained.chain)
    for name in posterior.theta():
        assert torch.equal(posterior.theta()[name], pooled.theta()[name]), name
    idata = posterior.to_inference_data([0.0, 1.0], num_draws=20)
    assert idata.posterior.sizes["chain"] == 3 and idata.posterior.sizes["draw"] == 20
    rhat = az.rhat(idata, var_names=["head_kept_fraction"])["head_kept_fraction"]
    assert rhat.dims == ("cost", "layer") and bool((rhat > 1).any())


def test_a_select_rule_reads_each_chains_own_posterior_and_network_and_keeps_its_lowest():
    seen = []

    def select(posterior, gated):  # scores the chain by what its adapters do to the output: any rule of both
        seen.append((posterior, sum(p.abs().sum().item() for n, p in gated.named_parameters() if "lora_B" in n)))
        return -posterior.seed  # the last chain wins
    chained = run(chains=3, seed=5, weights="lora", select=select)
    assert [p.seed for p, _ in seen] == [5, 6, 7] and chained.chain == 2
    assert [c["score"] for c in chained.chains] == [-5, -6, -7]
    assert all(c["validation_loss"] > 0 for c in chained.chains)
    for (posterior, adapters), seed in zip(seen, (5, 6, 7)):
        alone = run(seed=seed, weights="lora")
        assert posterior.num_chains == 1
        for name, loc in alone.posterior().locs.items():
            assert torch.equal(posterior.locs[name], loc), (seed, name)
        assert adapters > 0 and adapters != seen[0][1] or seed == 5  # each chain's own trained adapters
    kept = run(seed=7, weights="lora").gated.model.state_dict()
    for name, value in chained.gated.model.state_dict().items():  # the network is the winning chain's
        assert torch.equal(value, kept[name]), name


def test_point_read_outs_use_the_selected_chain_and_intervals_pool_every_chain():
    chained = run(chains=2)
    posterior = chained.posterior()
    alone = [GatePosterior.from_guide(guide, chained.model, None, 30, seed) for guide, seed in
             zip(chained.guides, (0, 1))]
    for chain in range(2):
        moved = dataclasses.replace(posterior, chain=chain)
        point = alone[chain].inclusion(1.0, point=True)["neuron"]
        assert torch.equal(moved.inclusion(1.0, point=True)["neuron"], point)
    pooled = posterior.inclusion(1.0)["neuron"]
    assert pooled.shape[0] == 60
    for chain in range(2):  # the same draws (vectorised over 60 draws rather than 30: equal to rounding)
        torch.testing.assert_close(pooled[30 * chain:30 * (chain + 1)], alone[chain].inclusion(1.0)["neuron"],
                                   rtol=0, atol=1e-6)


def test_convergence_reads_every_layer_and_needs_two_chains():
    posterior = run(chains=2).posterior()
    rows = posterior.convergence(1.0)
    assert {r["kind"] for r in rows} == {"head", "neuron"} and len(rows) == 2 * len(posterior.layer_names)
    assert all(r["r_hat"] > 0 and r["ess_bulk"] > 0 for r in rows)
    with pytest.raises(ValueError, match="chains >= 2"):
        run().posterior().convergence(1.0)


def test_adapter_chains_keep_the_selected_chains_adapters_and_resume(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    chained = run(chains=2, weights="lora", checkpoint=path)
    assert path.is_file() and chain_checkpoint(path, 1).is_file()
    single = run(seed=chained.chain, weights="lora")
    with chained.gated.unwrapped() as merged, single.gated.unwrapped() as expected:
        for (name, value), other in zip(merged.state_dict().items(), expected.state_dict().values()):
            assert torch.equal(value, other), name
    resumed = run(chains=2, weights="lora", checkpoint=path)  # every chain finished: read back, not refitted
    assert resumed.chains == chained.chains and resumed.history == chained.history


def test_joint_chains_restart_from_the_same_weights():
    chained = run(chains=2, weights="joint", weight_lr=0.05)
    single = run(seed=chained.chain, weights="joint", weight_lr=0.05)
    with chained.gated.unwrapped() as trained, single.gated.unwrapped() as expected:
        for (name, value), other in zip(trained.state_dict().items(), expected.state_dict().values()):
            assert torch.equal(value, other), name


def test_a_saved_posterior_keeps_its_chains_and_reads_one_written_before_chains(tmp_path):
    posterior = run(chains=2).posterior()
    posterior.save(tmp_path / "p.safetensors")
    loaded = GatePosterior.load(tmp_path / "p.safetensors")
    assert loaded.num_chains == 2 and loaded.chain == posterior.chain
    assert torch.equal(loaded.inclusion(1.0)["head"], posterior.inclusion(1.0)["head"])
    one = run().posterior()
    one.locs = {k: v[0] for k, v in one.locs.items()}      # the layout of a file written before chains
    one.scales = {k: v[0] for k, v in one.scales.items()}
    from bayesprune.core.io import save_tensors
    from bayesprune.core.posterior import POSTERIOR_FORMAT
    tensors = {f"loc.{k}": v for k, v in one.locs.items()} | {f"scale.{k}": v for k, v in one.scales.items()}
    tensors |= {f"importance.{k}": v for k, v in one.importance.items()} | one.sizes.to_tensors()
    save_tensors(tmp_path / "old.safetensors", tensors, POSTERIOR_FORMAT,
                 {"kinds": list(one.kinds), "layer_names": one.layer_names, "units": one.units,
                  "prior": one.prior.to_dict(), "fixed_cost": None, "num_draws": 30, "seed": 0})
    old = GatePosterior.load(tmp_path / "old.safetensors")
    assert old.num_chains == 1 and old.chain == 0
    assert torch.equal(old.inclusion(1.0)["head"], run().posterior().inclusion(1.0)["head"])


def test_a_run_of_chains_reports_r_hat_and_extracts_the_selected_chains_network(tiny_model_dir, corpus_dir,
                                                                                  tmp_path, capsys):
    from safetensors.torch import load_file

    from bayesprune import ModelTotals, tokenize, windows
    from bayesprune.evaluation.prediction import plan_quality
    from bayesprune.inputs.data import split_corpus
    from bayesprune.run.cli import main
    from bayesprune.run.rundir import load_fitted, load_fitted_model, read_config

    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--chains", "2", "--seed", "1", "--units", "head,neuron", "--target", "0.6", "--steps", "3",
                 "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "256", "--eval-window", "64",
                 "--spacing", "random", "--schedule", "constant", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "2 chains, validation loss per token" in printed and "R-hat max" in printed
    assert "predicted perplexity of each chain's cut at 0.6 of decoder parameters on 16 validation " in printed
    report = json.loads((run / "report.json").read_text())
    assert [c["seed"] for c in report["chains"]] == [1, 2] and len(report["convergence"]) == 2 * 4
    scores = [c["score"] for c in report["chains"]]
    assert report["selected_chain"] == scores.index(min(scores)) == 1  # settings under which chain 1 wins, so
    # the extractions below must read the second chain's adapters
    config, posterior = read_config(run), load_fitted(run)
    network, tokenizer = load_fitted_model(run, adapter_share=ExtractionConfig().adapter_share)  # as extract cuts
    totals = ModelTotals.of(network)
    validation = tokenize(tokenizer, split_corpus(config.data)["validation"])
    gated = gate(network, GateConfig(units=posterior.kinds))
    plan = posterior.plan("0.6", totals)  # the selected chain's score, from the run's files alone
    predicted = plan_quality(gated, plan, posterior.amplitudes(plan.cost, point=True), windows(validation, 64)[:16])
    assert predicted["nll"] == pytest.approx(scores[1], rel=1e-4)
    gated.remove()
    assert az.from_netcdf(run / "posterior.nc").posterior.sizes["chain"] == 2
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in-memory"
    assert main(["extract", str(run), "--target", "0.6", "--out", str(streamed)]) == 0
    assert main(["extract", str(run), "--target", "0.6", "--out", str(in_memory), "--in-memory"]) == 0
    fitted = load_file(run / "extracted" / "model.safetensors")
    for folder in (streamed, in_memory):
        for name, value in load_file(folder / "model.safetensors").items():
            assert torch.allclose(value, fitted[name], atol=1e-6), (folder, name)
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(tmp_path / "one"),
                 "--units", "head,neuron", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--eval-tokens", "256", "--eval-window", "64"]) == 0
    assert "one chain: fit with --chains 2" in capsys.readouterr().out


def test_a_guide_set_to_a_posterior_chain_scores_as_the_fitted_one_did():
    from bayesprune.core.fit import SplitELBO, validation_loss
    from bayesprune.core.guide import CostConditionedGuide

    chained = run(chains=2)
    posterior = chained.posterior()
    for chain in range(2):
        guide = CostConditionedGuide(chained.model.prior)
        guide.set_sites({k: v[chain] for k, v in posterior.locs.items()},
                        {k: v[chain] for k, v in posterior.scales.items()})
        for key, value in chained.guides[chain].state_dict().items():
            assert torch.allclose(guide.state_dict()[key], value, atol=1e-6), key
        loss = validation_loss(SplitELBO(chained.model, guide), chained.model, VALIDATION, chained.cost, 4, 0)
        assert loss == pytest.approx(chained.chains[chain]["validation_loss"], rel=1e-5)


def test_the_interval_for_another_seed_covers_a_new_chain_as_often_as_it_says():
    from bayesprune.core.posterior import seed_interval

    generator = np.random.default_rng(0)
    hits, pooled = [], []
    for _ in range(2000):  # chains whose centres scatter far more widely than each chain's draws
        centres = generator.normal(0, 1, 4)
        draws = centres[:, None] + generator.normal(0, 0.05, (4, 50))
        low, high = seed_interval(draws[:3, :, None])
        hits.append(bool(low[0] <= draws[3].mean() <= high[0]))
        low, high = np.quantile(draws[:3].reshape(-1), [0.05, 0.95])  # the three chains' draws pooled
        pooled.append(bool(low <= draws[3].mean() <= high))
    assert np.mean(hits) == pytest.approx(0.9, abs=0.03) and np.mean(pooled) < 0.6
    with pytest.raises(ValueError, match="two chains"):
        seed_interval(draws[:1])
    wide = np.array([[[0.05], [0.06]], [[0.9], [0.95]]])  # two chains far apart: t(1) reaches past [0, 1]
    assert seed_interval(wide)[0][0] < 0 and seed_interval(wide)[1][0] > 1
    low, high = seed_interval(wide, bounds=(0.0, 1.0))
    assert (low[0], high[0]) == (0.0, 1.0)


def test_two_chains_add_the_interval_for_another_seed_to_the_width_summary():
    rows = run(chains=2).posterior().width_summary(1.0)
    assert all(0 <= r["seed_5%"] <= r["kept_fraction"] <= r["seed_95%"] <= 1 for r in rows)
    assert "seed_5%" not in run().posterior().width_summary(1.0)[0]
