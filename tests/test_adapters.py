import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bayesprune import ExtractionConfig, FitConfig, GateConfig, ModelTotals, extract, fit, gate
from bayesprune.core import adapters as ad
from bayesprune.run.cli import main
from bayesprune.run.rundir import load_fitted, load_fitted_model
from bayesprune.inputs.pruned import load_pruned
from tests.conftest import VOCAB, tiny_model
from tests.test_cli import FIT_ARGS

SEQUENCES = torch.randint(0, VOCAB, (12, 12), generator=torch.Generator().manual_seed(0))


def units_for(family: str) -> tuple[str, ...]:
    return ("block", "attn", "mlp", "neuron") if family == "gpt2" else ("block", "attn", "mlp", "head", "neuron")


def test_adapters_start_as_the_identity_train_through_the_gates_and_merge_exactly(family):
    gated = gate(tiny_model(family), GateConfig(units=units_for(family)))
    with torch.no_grad():
        before = gated(input_ids=SEQUENCES).logits
    trainable = ad.add_adapters(gated, rank=4, alpha=8)
    assert all(not p.requires_grad for n, p in gated.model.named_parameters() if ".lora_" not in n)
    with torch.no_grad():
        torch.testing.assert_close(gated(input_ids=SEQUENCES).logits, before)
    gates = {k: torch.full(gated.values.shape(k), 0.7) for k in gated.kinds}
    with gated.gates_set(gates):
        gated(input_ids=SEQUENCES).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gated.model.named_parameters()
               if ".lora_B." in n)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.1 * torch.randn_like(p))
        adapted = gated(input_ids=SEQUENCES).logits
        with ad.adapters_disabled(gated.model):
            torch.testing.assert_close(gated(input_ids=SEQUENCES).logits, before)
        with ad.adapters_scaled(gated.model, 0.5):  # as the adapters merged at half their size
            half = gated(input_ids=SEQUENCES).logits
        with gated.unwrapped() as plain:
            tensors = {f"network.{k}": p for k, p in plain.named_parameters() if ".lora_" in k}
        expected = tiny_model(family)
        ad.merge_checkpoint_adapters(expected, tensors, 0.5 * 8 / 4)
        torch.testing.assert_close(half, expected(input_ids=SEQUENCES).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(half, adapted, atol=1e-3) and not torch.allclose(half, before, atol=1e-3)
        torch.testing.assert_close(gated(input_ids=SEQUENCES).logits, adapted)  # the fitted size back
    ad.merge_adapters(gated.model)
    assert not ad._lora_layers(gated.model)
    with torch.no_grad():
        torch.testing.assert_close(gated(input_ids=SEQUENCES).logits, adapted, atol=1e-4, rtol=1e-4)
    plain = gated.remove()
    assert not any(".lora_" in n or "base_layer" in n for n in plain.state_dict())


@pytest.mark.parametrize("likelihood", ["nll", "distillation"])
def test_a_lora_fit_trains_adapters_only_and_extracts_the_hard_gated_adapted_model(likelihood):
    model = tiny_model("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gated = gate(model, GateConfig(units=("head", "neuron")))
    config = FitConfig(steps=6, batch_size=4, seq_len=12, weights="lora", lora_rank=4, lora_lr=1e-2,
                       likelihood=likelihood)
    result = fit(gated, SEQUENCES, config, progress=False)
    if likelihood == "distillation":  # the teacher is the network without adapters: a dense start scores 0
        assert result.history[0]["likelihood"] < result.history[0]["nll"]
    posterior = result.posterior()
    merged = gated.remove()
    assert not ad._lora_layers(merged) and set(merged.state_dict()) == set(original)
    assert any(not torch.equal(merged.state_dict()[k], v) for k, v in original.items())
    small, plan = extract(merged, posterior, "0.6")
    hard = gate(merged, GateConfig(units=("head", "neuron")))
    with torch.no_grad(), hard.gates_set(plan.gates(hard.kinds, hard.values.units),
                                         posterior.amplitudes(plan.cost, point=True)):
        expected = hard(input_ids=SEQUENCES).logits
        torch.testing.assert_close(small(input_ids=SEQUENCES).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_lora_run_streams_its_adapters_into_the_kept_slices_at_their_share(tiny_model_dir, corpus_dir, tmp_path,
                                                                            capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "head,neuron", "--weights", "lora", "--lora-rank", "4", "--target", "none",
                 *FIT_ARGS]) == 0
    capsys.readouterr()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    posterior = load_fitted(run)
    ids = SEQUENCES[:4]
    outputs = {}
    for form, loader, share in (("per-layer", load_pruned, None), ("uniform", AutoModelForCausalLM.from_pretrained,
                                                                   None), ("per-layer", load_pruned, 1.0)):
        adapted, _ = load_fitted_model(run, adapter_share=ExtractionConfig().adapter_share if share is None else share)
        assert any(not torch.equal(adapted.state_dict()[k], v) for k, v in base.state_dict().items())
        options = ["--recovery-steps", "0"] + ([] if share is None else ["--adapter-share", str(share)])  # the cut
        streamed, in_memory = tmp_path / f"streamed-{form}-{share}", tmp_path / f"memory-{form}-{share}"
        assert main(["extract", str(run), "--target", "0.6", "--form", form, "--out", str(streamed), *options]) == 0
        record = json.loads(capsys.readouterr().out)
        assert main(["extract", str(run), "--target", "0.6", "--form", form, "--out", str(in_memory),
                     "--in-memory", *options]) == 0
        capsys.readouterr()
        plan = posterior.plan("0.6", ModelTotals.of(adapted), form)
        assert record["fraction_of_decoder"] == pytest.approx(plan.fraction)
        assert record["extraction"]["adapter_share"] == (0.5 if share is None else share)
        hard = gate(adapted, GateConfig(units=("head", "neuron")))
        with torch.no_grad(), hard.gates_set(plan.gates(hard.kinds, hard.values.units),
                                             posterior.amplitudes(plan.cost, point=True)):
            expected = hard(input_ids=ids).logits
        hard.remove()
        with torch.no_grad():
            for path in (streamed, in_memory):
                torch.testing.assert_close(loader(path)(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        outputs[form, share] = expected
    assert not torch.allclose(outputs["per-layer", None], outputs["per-layer", 1.0], atol=1e-3)


def test_adapters_on_a_bfloat16_network_train_in_float32_and_keep_its_output_dtype():
    gated = gate(tiny_model("llama").to(torch.bfloat16), GateConfig(units=("head", "neuron")))
    with torch.no_grad():
        before = gated(input_ids=SEQUENCES).logits
    trainable = ad.add_adapters(gated, rank=4, alpha=8)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    with torch.no_grad():
        after = gated(input_ids=SEQUENCES).logits
    assert after.dtype == torch.bfloat16
    torch.testing.assert_close(after, before)
    gated(input_ids=SEQUENCES).logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in gated.model.named_parameters()
               if ".lora_B." in n)


def test_float32_adapters_compute_in_a_bfloat16_networks_dtype():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Outputs(TorchDispatchMode):  # the dtype and size of every tensor an operation makes
        made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.made += [(t.dtype, t.numel()) for t in (out if isinstance(out, (tuple, list)) else [out])
                          if isinstance(t, torch.Tensor)]
            return out

    gated = gate(tiny_model("llama").to(torch.bfloat16), GateConfig(units=("head", "neuron")))
    ad.add_adapters(gated, rank=4, alpha=8)
    name, layer = ad._lora_layers(gated.model)[0]
    a, b = layer.lora_A[ad.ADAPTER].weight, layer.lora_B[ad.ADAPTER].weight
    with torch.no_grad():
        b.normal_()
    x = torch.randn(3, 5, a.shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x.requires_grad_(True)
    with Outputs() as seen:
        out = layer(x)
        out.sum().backward()
    base = layer.get_base_layer().weight.double()
    exact = x.double() @ base.T + (x.double() @ a.double().T @ b.double().T) * layer.scaling[ad.ADAPTER]
    assert out.dtype == torch.bfloat16 and a.dtype == b.dtype == torch.float32, name
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)
    # Forward and backward make nothing the size of the activations in float32; the weights' gradients are float32.
    assert a.numel() < x.numel() and b.numel() < out.numel()
    assert not [n for dtype, n in seen.made if dtype == torch.float32 and n >= min(x.numel(), out.numel())]
    assert a.grad.dtype == b.grad.dtype == torch.float32 and b.grad.abs().sum() > 0
