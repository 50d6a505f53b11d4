"""The real default model, SmolLM2-135M-Instruct (converted once from its GGUF and cached)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bayesprune import GateConfig, extract_model, gate, load_model, save_extracted
from bayesprune.core.plan import ExtractionPlan, LayerPlan


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def test_default_model_is_smollm2(smollm):
    model, tokenizer = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(model.config, "quantization_config")


def test_gates_and_extraction_are_exact_on_the_real_model(smollm, tmp_path):
    model, tokenizer = smollm
    ids = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits
        gated = gate(model, GateConfig(units=("block", "attn", "mlp")))
        assert torch.equal(gated(input_ids=ids).logits, reference)
        closed = torch.ones(30)
        closed[[4, 11, 20]] = 0
        with gated.gates_set({"block": closed}):
            hard_gated = gated(input_ids=ids).logits
        model = gated.remove()
        plan = ExtractionPlan([LayerPlan(i) for i in range(30) if i not in (4, 11, 20)], 30)
        small = extract_model(model, plan)
        assert torch.equal(small(input_ids=ids).logits, hard_gated)
        out = save_extracted(small, tokenizer, tmp_path / "small", {})
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert reloaded.config.num_hidden_layers == 27
        assert torch.allclose(reloaded(ids).logits, hard_gated, atol=1e-5)
        text = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
        assert text.shape[1] == ids.shape[1] + 4


def test_width_extraction_on_the_real_model_streams_what_memory_builds(smollm, tmp_path):
    from bayesprune import load_pruned
    from bayesprune.cut.extraction import extract_streaming
    from bayesprune.inputs.pretrained import default_model_dir

    model, tokenizer = smollm
    ids = tokenizer("Now is the winter of our discontent", return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gated = gate(model, GateConfig(units=("block", "head", "neuron")))
        mask = {"block": torch.ones(30), "head": torch.ones(30, 3),
                "neuron": (torch.rand(30, 1536, generator=g) > 0.5).float()}
        mask["block"][[7, 19]] = 0
        mask["head"][[0, 5, 28], [2, 0, 1]] = 0
        with gated.gates_set(mask):
            hard_gated = gated(input_ids=ids).logits
        model = gated.remove()
        layers = [LayerPlan(i, {kind: torch.nonzero(mask[kind][i]).flatten().tolist() for kind in ("head", "neuron")})
                  for i in range(30) if mask["block"][i]]
        plan = ExtractionPlan(layers, 30)
        small = extract_model(model, plan)
        assert torch.allclose(small(input_ids=ids).logits, hard_gated, atol=1e-4)
        out = extract_streaming(default_model_dir(), plan, tmp_path / "streamed", plan.record())
        streamed = load_pruned(out)
        assert torch.equal(streamed(input_ids=ids).logits, small(input_ids=ids).logits)
        assert streamed.num_parameters() == small.num_parameters() < model.num_parameters()


def test_the_scan_finds_the_heads_whose_removal_alone_breaks_the_real_model(smollm):
    from bayesprune.core.likelihood import calibration_nll
    from bayesprune.core.removal import critical_units
    from bayesprune.inputs.data import python_documents, shakespeare_documents

    model, tokenizer = smollm
    prose = tokenizer(shakespeare_documents()[0].text[:2000], return_tensors="pt").input_ids[0]
    code = tokenizer(python_documents()[0].text[:2000], return_tensors="pt").input_ids[0]
    windows = torch.stack([prose[:64], prose[64:128], code[:64], code[64:128]])
    gated = gate(model, GateConfig(units=("head",)))
    try:
        found = critical_units(gated, windows, 0.5)["head"]
        assert {(0, 2), (1, 1)} <= {tuple(u) for u in found.nonzero().tolist()}  # (layer, head group)
        dense = calibration_nll(gated, windows)
        for layer, group in found.nonzero().tolist():
            off = torch.ones(30, 3)
            off[layer, group] = 0
            with gated.gates_set({"head": off}):
                assert calibration_nll(gated, windows) - dense > 0.5
    finally:
        gated.remove()
