import arviz as az
import numpy as np
import pytest
import torch

from bayesprune import FitConfig, GateConfig, GatePosterior, fit, gate
from tests.conftest import VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (16, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def posterior():
    gated = gate(tiny_model("llama"), GateConfig(units=("block", "attn", "mlp")))
    result = fit(gated, SEQUENCES, FitConfig(steps=3, batch_size=4, seq_len=10), progress=False)
    return result.posterior(300)


def test_draw_shapes(posterior):
    assert posterior.num_draws == 300
    for kind in ("block", "attn", "mlp"):
        assert posterior.draws(f"{kind}_logit").shape == (300, 4)
        assert posterior.draws(f"{kind}_local_scale").shape == (300, 4)
        assert posterior.draws(f"{kind}_mean_logit").shape == (300,)
        assert posterior.draws(f"{kind}_global_scale").shape == (300,)
        assert (posterior.draws(f"{kind}_global_scale") > 0).all()


def test_draws_follow_the_guide_and_repeat(posterior):
    draws = posterior.draws("block_logit")
    assert torch.equal(draws, posterior.draws("block_logit"))
    assert torch.allclose(draws.mean(0), posterior.locs["block_logit"], atol=4 * 0.1 / 300 ** 0.5 * 3)
    assert torch.allclose(posterior.draws("block_global_scale").log().std(), posterior.scales["block_global_scale"],
                          rtol=0.2)


@pytest.fixture(scope="module")
def width_posterior():
    gated = gate(tiny_model("qwen3"), GateConfig(units=("block", "head", "neuron")))
    return fit(gated, SEQUENCES, FitConfig(steps=3, batch_size=4, seq_len=10), progress=False).posterior(200)


def test_width_sites_have_layer_and_unit_dims(width_posterior):
    assert width_posterior.units("head") == 2 and width_posterior.units("neuron") == 48
    assert width_posterior.units("block") is None
    assert width_posterior.inclusion_mean("neuron").shape == (4, 48)
    idata = width_posterior.to_inference_data(50)
    assert idata.posterior["head_inclusion"].dims == ("chain", "draw", "layer", "head")
    assert idata.posterior["neuron_logit"].shape == (1, 50, 4, 48)
    assert list(idata.posterior.coords["neuron"].values) == list(range(48))
    assert idata.posterior["neuron_kept_fraction"].dims == ("chain", "draw", "layer")
    rows = width_posterior.width_summary()
    assert len(rows) == 2 * 4 and {r["kind"] for r in rows} == {"head", "neuron"}
    assert all(r["hdi_3%"] <= r["kept_fraction"] <= r["hdi_97%"] for r in rows)


def test_width_plot_is_written(width_posterior, tmp_path):
    from bayesprune.plots import plot_width

    plot_width(width_posterior, tmp_path / "width.png")
    assert (tmp_path / "width.png").stat().st_size > 10_000


def test_inference_data_names_dims_and_coords(posterior):
    idata = posterior.to_inference_data()
    assert set(idata.groups()) == {"posterior"}
    names = {f"{k}_{v}" for k in ("block", "attn", "mlp")
             for v in ("logit", "local_scale", "inclusion", "mean_logit", "global_scale")}
    assert set(idata.posterior.data_vars) == names | {"kept_fraction"}
    assert idata.posterior["block_inclusion"].dims == ("chain", "draw", "layer")
    assert idata.posterior["block_global_scale"].dims == ("chain", "draw")
    assert list(idata.posterior.coords["layer"].values) == [f"model.layers.{i}" for i in range(4)]
    table = az.summary(idata, var_names=["block_inclusion"], kind="stats")
    assert list(table.index) == [f"block_inclusion[model.layers.{i}]" for i in range(4)]
    kept = idata.posterior["kept_fraction"].values
    assert ((kept >= 0) & (kept <= 1)).all()


def test_removal_probabilities_are_consistent(posterior):
    p = posterior.removal_probability()
    assert p.shape == (4, 5)
    assert torch.all(p[:, 0] == 0) and torch.all(p[:, -1] == 1)
    assert torch.all(p[:, 1:] >= p[:, :-1]), "more removed ⇒ at least as likely to be among them"
    assert torch.allclose(p.sum(0), torch.arange(5, dtype=torch.float32)), "k blocks are removed for each k"


def test_keep_probability_nests_branches_under_blocks():
    locs = {"block_logit": torch.tensor([10.0, 10.0]), "attn_logit": torch.tensor([-10.0, 10.0]),
            "mlp_logit": torch.tensor([-10.0, -10.0])}
    scales = {k: torch.zeros(2) for k in locs}
    sizes = {k: torch.ones(2, dtype=torch.float64) for k in ("attn", "mlp", "other")}
    p = GatePosterior(("block", "attn", "mlp"), ["a", "b"], locs, scales, frozenset(), sizes,
                      num_draws=1).block_keep_probability()
    assert p[0, 0].item() == pytest.approx(0.0, abs=1e-4), "both branches off: the block is gone"
    assert p[0, 1].item() == pytest.approx(1.0, abs=1e-4)


def test_summary_ranks_by_inclusion(posterior):
    rows = posterior.summary()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    inclusion = [r["inclusion"] for r in rows]
    assert inclusion == sorted(inclusion, reverse=True)
    assert all(r["hdi_3%"] <= r["inclusion"] <= r["hdi_97%"] for r in rows)
    assert [rows[i]["layer"] for i in range(4)] == \
        [posterior.layer_names[i] for i in posterior.ranking()]


def test_save_and_load_round_trip(posterior, tmp_path):
    posterior.save(tmp_path / "p.safetensors")
    loaded = GatePosterior.load(tmp_path / "p.safetensors")
    assert loaded.kinds == posterior.kinds and loaded.layer_names == posterior.layer_names
    assert loaded.positive == posterior.positive and loaded.num_draws == posterior.num_draws
    for key in posterior.locs:
        assert torch.equal(loaded.draws(key), posterior.draws(key))
    np.testing.assert_array_equal(loaded.removal_probability(), posterior.removal_probability())


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="not written by bayesprune"):
        GatePosterior.load(tmp_path / "foreign.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GatePosterior.load(tmp_path / "corrupt.safetensors")
