import pytest
import torch

from bayesprune.core.architectures import decoder_layers
from bayesprune.core.likelihood import sequence_nll
from bayesprune.baselines.unstructured import (nonzero_fraction, prune_unstructured, sparsegpt_prune, sparsity_for,
                                     wanda_prune)
from tests.conftest import VOCAB, tiny_model

WINDOWS = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


def test_wanda_keeps_the_largest_weight_times_input_norm_per_row():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                           [0.1, 0.2, -0.3, 0.4]])
    sq_norms = torch.tensor([1.0, 0.01, 1.0, 100.0])  # ‖X_j‖ = 1, 0.1, 1, 10
    # scores row 0: 1, 0.2, 3, 5 -> drop columns 0, 1; row 1: 0.1, 0.02, 0.3, 4 -> drop 0, 1
    pruned = wanda_prune(weight, sq_norms, 0.5)
    assert torch.equal(pruned, torch.tensor([[0.0, 0.0, 3.0, 0.5], [0.0, 0.0, -0.3, 0.4]]))
    # Magnitude alone would have kept -2.0: the input norm is what moves it out.


def test_wanda_two_four_keeps_two_of_every_four_inputs():
    weight = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    sq_norms = torch.tensor([1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 1.0, 1.0])
    pruned = wanda_prune(weight, sq_norms, 0.0, pattern=(2, 4))
    assert torch.equal(pruned, torch.tensor([[4.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0, 4.0]]))


def _layer_problem(seed: int = 0, rows: int = 24, columns: int = 64, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / columns ** 0.5
    scales = torch.rand(columns, generator=g) * 3 + 0.1
    x = (torch.randn(tokens, columns, generator=g) @ mixing + 0.3 * torch.randn(tokens, 1, generator=g)) * scales
    weight = torch.randn(rows, columns, generator=g)
    return weight, x.double()


def _error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (weight.double() - pruned.double()).T) ** 2).sum())


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_the_layer_output_better_than_wanda(pattern):
    weight, x = _layer_problem()
    hessian = x.T @ x
    wanda = wanda_prune(weight, (x ** 2).sum(0), 0.5, pattern)
    sparsegpt = sparsegpt_prune(weight, hessian, 0.5, pattern, block_size=16)
    assert (sparsegpt == 0).float().mean().item() == pytest.approx(0.5)
    assert _error(weight, sparsegpt, x) < 0.8 * _error(weight, wanda, x)
    if pattern is not None:
        groups = (sparsegpt != 0).view(weight.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all()


def test_sparsegpt_at_zero_sparsity_leaves_the_weight_alone():
    weight, x = _layer_problem(1)
    assert torch.allclose(sparsegpt_prune(weight, x.T @ x, 0.0, block_size=16), weight, atol=1e-6)


def test_sparsegpt_prunes_inputs_that_never_fire():
    weight, x = _layer_problem(2)
    x[:, 5] = 0
    pruned = sparsegpt_prune(weight, x.T @ x, 0.25, block_size=16)
    assert (pruned[:, 5] == 0).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_a_model_hits_the_sparsity_and_keeps_it_working(family, method):
    model = tiny_model(family)
    sparsity = sparsity_for(model, 0.6)
    result = prune_unstructured(model, WINDOWS, method, sparsity, progress=False)
    assert result.kept_fraction == pytest.approx(0.6, abs=0.01)
    assert nonzero_fraction(model) == pytest.approx(result.kept_fraction)
    assert result.calibration_tokens == WINDOWS.numel()
    with torch.no_grad():
        assert torch.isfinite(sequence_nll(model, WINDOWS)).all()


def test_every_family_can_be_pruned_two_four(family):
    model = tiny_model(family)
    prune_unstructured(model, WINDOWS, "sparsegpt", pattern=(2, 4), progress=False)
    for block in decoder_layers(model):
        for name, p in block.named_parameters():
            if p.dim() == 2 and "norm" not in name:
                weight = p.T if family == "gpt2" else p
                assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all(), name


def test_blocks_are_pruned_on_the_outputs_of_already_pruned_blocks():
    """Block 1's statistics must come from pruned block 0, as in both papers."""
    from bayesprune.baselines.unstructured import _first_block_inputs, _InputStatistics, _linears, _run_block

    model = tiny_model("llama")
    reference = tiny_model("llama")
    prune_unstructured(model, WINDOWS, "wanda", 0.5, progress=False)
    # Redo block 1 by hand: inputs = outputs of the *pruned* block 0 copied into the reference.
    with torch.no_grad():
        decoder_layers(reference)[0].load_state_dict(decoder_layers(model)[0].state_dict())
        inputs = _first_block_inputs(reference, WINDOWS, 4)
        hidden = _run_block(decoder_layers(reference)[0], inputs)
        block = decoder_layers(reference)[1]
        stats = _InputStatistics(_linears(block), full=False)
        _run_block(block, [(h, a, k) for h, (_, a, k) in zip(hidden, inputs)])
        stats.close()
        expected = wanda_prune(block.self_attn.q_proj.weight, stats.sums["self_attn.q_proj"], 0.5)
    assert torch.equal(decoder_layers(model)[1].self_attn.q_proj.weight, expected)


def test_bad_requests_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown method"):
        prune_unstructured(model, WINDOWS, "magnitude")
    with pytest.raises(ValueError, match="sparsity"):
        prune_unstructured(model, WINDOWS, "wanda", 1.0)
    with pytest.raises(ValueError, match="cannot be reached"):
        sparsity_for(model, 0.005)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_blocks_moved_to_a_device_one_at_a_time_prune_as_in_place(device):
    windows = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    here, moved = tiny_model("llama").double(), tiny_model("llama").double()
    prune_unstructured(here, windows, "sparsegpt", 0.5, progress=False)
    prune_unstructured(moved, windows, "sparsegpt", 0.5, progress=False, device=device)
    assert all(p.device.type == "cpu" for p in moved.parameters())
    for a, b in zip(here.parameters(), moved.parameters()):
        assert torch.allclose(a, b, atol=1e-8)
