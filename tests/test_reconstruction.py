"""Reconstruction at extraction: the kept columns of each narrowed output projection refitted by least squares."""

import json

import pytest
import torch

from bayesprune import GateConfig, extract_model, gate
from bayesprune.core.config import ExtractionConfig
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
    assert record["damping"] == 0.5
    with pytest.raises(ValueError, match="damping must be a finite number >= 0, got -1"):
        ExtractionConfig("0.6", reconstruction="least-squares", damping=-1.0)
    with pytest.raises(ValueError, match="needs it in memory"):
        run_extract(run, ExtractionConfig("0.6", reconstruction="least-squares"), tmp_path / "s", streaming=True)
    assert not (tmp_path / "s").exists()
