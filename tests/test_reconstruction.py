"""Reconstruction at extraction: the kept columns of each narrowed output projection refitted by least squares."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bayesprune import GateConfig, extract_model, gate, load_pruned
from bayesprune.core.config import ExtractionConfig
from bayesprune.cut.extraction import save_extracted
from bayesprune.cut.reconstruction import least_squares_columns, output_error, reconstruct
from bayesprune.run.cli import main
from bayesprune.run.extract_job import run_extract
from tests.conftest import VOCAB, tiny_model
from tests.test_cli import FIT_ARGS
from tests.test_selection_and_slicing import plan_of, random_amplitudes, random_mask, width_units


def _moment(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 2] = 0  # a channel that never fires
    return x.T @ x


def test_the_refit_on_unchanged_inputs_is_the_structured_obs_update_with_a_damped_hessian():
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moment, kept, removed, damping = _moment(40, 8), [0, 3, 4, 6], [1, 2, 5, 7], 0.01
    h = moment + damping * moment[kept][:, kept].diagonal().mean() * torch.eye(8, dtype=torch.float64)
    g = torch.linalg.inv(h)
    # optimal brain surgeon: W − W_S (G_SS)⁻¹ G_S,: removes S and compensates the rest
    obs = weight - weight[:, removed] @ torch.linalg.inv(g[removed][:, removed]) @ g[removed]
    assert torch.allclose(obs[:, removed], torch.zeros(5, 4, dtype=torch.float64), atol=1e-10)
    refit = least_squares_columns(weight, kept, moment[:, kept], moment[kept][:, kept], damping)
    assert torch.allclose(refit, obs[:, kept], atol=1e-10)
    # a large damping keeps the columns as they were; none at all is plain least squares
    assert torch.allclose(least_squares_columns(weight, kept, moment[:, kept], moment[kept][:, kept], 1e9),
                          weight[:, kept], atol=1e-6)
    best = least_squares_columns(weight, kept, moment[:, kept], moment[kept][:, kept], 0.0)
    wanted = torch.trace(weight @ moment @ weight.T).item()
    errors = [output_error(weight, best * scale, wanted, moment[:, kept], moment[kept][:, kept])
              for scale in (0.9, 1.0, 1.1)]
    assert 0 < errors[1] < min(errors[0], errors[2])
    assert output_error(weight, weight, wanted, moment, moment) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_a_refitted_extraction_tracks_the_dense_network_closer_than_the_plain_cut(family):
    model = tiny_model(family)
    gated = gate(model, GateConfig(units=width_units(family)))
    mask, amplitudes = random_mask(gated), random_amplitudes(gated)
    gated.remove()
    plan = plan_of(mask).fold(amplitudes)
    calibration = torch.randint(0, VOCAB, (16, 24), generator=torch.Generator().manual_seed(5))
    cut = extract_model(model, plan)
    refitted = extract_model(model, plan)
    stats = reconstruct(model, refitted, plan, calibration, progress=False)
    assert stats["projections"] > 0 and stats["relative_error_refitted"] < stats["relative_error_cut"]
    touched = {name for name, p in refitted.state_dict().items() if not torch.equal(p, cut.state_dict()[name])}
    assert touched and all(name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")) for name in touched)
    held_out = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = model(input_ids=held_out).logits
        gap = {name: (m(input_ids=held_out).logits - dense).square().mean().item()
               for name, m in (("cut", cut), ("refitted", refitted))}
    assert gap["refitted"] < gap["cut"], gap


def test_extract_refits_an_adapter_run_in_memory_and_records_it(tiny_model_dir, corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run), "--target",
                 "none", "--units", "head,neuron", "--weights", "lora", *FIT_ARGS]) == 0
    out = tmp_path / "small"
    assert main(["extract", str(run), "--target", "0.6", "--out", str(out), "--reconstruction", "least-squares",
                 "--calibration-tokens", "256", "--damping", "0.5"]) == 0
    record = json.loads((out / "bayesprune_extraction.json").read_text())["reconstruction"]
    assert record["tokens"] >= 256 - 64 and record["relative_error_refitted"] < record["relative_error_cut"]
    assert record["damping"] == 0.5 and record["method"] == "least-squares"
    uniform = tmp_path / "uniform"  # bias compensation in the form plain transformers loads: the switches are on
    assert main(["extract", str(run), "--target", "0.6", "--form", "uniform", "--out", str(uniform),
                 "--reconstruction", "bias", "--calibration-tokens", "256"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(uniform)
    assert plain.config.attention_bias and plain.config.mlp_bias and plain.model.layers[0].mlp.down_proj.bias.any()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=tokens).logits, load_pruned(uniform)(input_ids=tokens).logits)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0, got -1"):
        ExtractionConfig("0.6", reconstruction="least-squares", damping=-1.0)
    with pytest.raises(ValueError, match="need it in memory"):
        run_extract(run, ExtractionConfig("0.6", reconstruction="least-squares"), tmp_path / "s", streaming=True)
    assert not (tmp_path / "s").exists()


def _mean_outputs(network: torch.nn.Module, names: list[str], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean output of each module ``names`` over a forward pass on ``tokens``."""
    means, handles = {}, []
    for name in names:
        def hook(_module, _args, out, name=name):
            means[name] = out.reshape(-1, out.shape[-1]).double().mean(0)
        handles.append(network.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        network(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return means


@pytest.mark.parametrize("family,method", [("llama", "bias"), ("llama", "least-squares+bias"), ("gpt2", "bias"),
                                           ("gemma2", "bias")])
def test_bias_compensation_gives_each_projection_the_dense_mean_output_and_survives_a_save(family, method, tmp_path):
    model = tiny_model(family)
    gated = gate(model, GateConfig(units=width_units(family)))
    mask = random_mask(gated)
    gated.remove()
    plan = plan_of(mask)
    calibration = torch.randint(0, VOCAB, (16, 24), generator=torch.Generator().manual_seed(5))
    cut, compensated = extract_model(model, plan), extract_model(model, plan)
    if family == "gemma2":  # no config switch gives its MLP output projection a bias
        with pytest.raises(ValueError, match=r"needs a bias on \['mlp.down_proj'\]"):
            reconstruct(model, compensated, plan, calibration, progress=False, method=method)
        return
    stats = reconstruct(model, compensated, plan, calibration, progress=False, method=method)
    assert stats["method"] == method and stats["relative_error_refitted"] < stats["relative_error_cut"]
    changed = {name for name, p in compensated.state_dict().items()
               if name not in cut.state_dict() or not torch.equal(p, cut.state_dict()[name])}
    outputs = ("o_proj.bias", "down_proj.bias", "c_proj.bias")
    assert any(name.endswith(outputs) for name in changed)
    if method == "bias":  # the weights stay as cut; a bias a switch adds elsewhere stays at zero
        assert all(name.endswith(outputs) or not compensated.state_dict()[name].any() for name in changed)
    kept = {layer.index: j for j, layer in enumerate(plan.layers)}
    prefix = "transformer.h" if family == "gpt2" else "model.layers"
    names = [(f"{prefix}.{i}.{inner}", f"{prefix}.{j}.{inner}") for i, j in kept.items()
             for inner in (("attn.c_proj", "mlp.c_proj") if family == "gpt2" else ("self_attn.o_proj", "mlp.down_proj"))
             if _has(compensated, f"{prefix}.{j}.{inner}") and _narrowed(model, compensated, f"{prefix}.{i}.{inner}",
                                                                      f"{prefix}.{j}.{inner}")]
    dense_means = _mean_outputs(model, [d for d, _ in names], calibration)
    small_means = _mean_outputs(compensated, [s for _, s in names], calibration)
    assert names
    for dense_name, small_name in names:  # on the calibration text, each narrowed projection misses nothing on average
        assert torch.allclose(small_means[small_name], dense_means[dense_name], atol=1e-4), small_name
    reloaded = load_pruned(save_extracted(compensated, None, tmp_path / "small", {}))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=calibration).logits, compensated(input_ids=calibration).logits,
                              atol=1e-5)


def _has(network: torch.nn.Module, name: str) -> bool:
    try:
        network.get_submodule(name)
    except AttributeError:
        return False
    return True


def _narrowed(model: torch.nn.Module, small: torch.nn.Module, dense_name: str, small_name: str) -> bool:
    return model.get_submodule(dense_name).weight.shape != small.get_submodule(small_name).weight.shape
