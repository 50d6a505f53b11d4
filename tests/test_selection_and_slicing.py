import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from bayesprune import GateConfig, ModelTotals, extract_model, gate, load_pruned, save_extracted
from bayesprune.core.plan import ExtractionPlan, LayerPlan
from bayesprune.core.targets import Target, TargetError
from bayesprune.cut.extraction import extract_streaming
from bayesprune.core.architectures import count_parameters, decoder_layers
from tests.conftest import VOCAB, posterior_for, tiny_model


def width_units(family: str) -> tuple[str, ...]:
    return ("block", "attn", "mlp", "neuron") + (() if family == "gpt2" else ("head",))


def random_mask(gated, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hard gates with a closed block, a closed branch, and some heads and neurons off."""
    g = torch.Generator().manual_seed(seed)
    mask = {k: torch.ones(gated.values.shape(k)) for k in gated.kinds}
    mask["block"][1] = 0
    mask["attn"][2] = 0
    mask["mlp"][3] = 0 if "head" not in mask else 1
    if "head" in mask:
        mask["head"][0, 1] = 0
        mask["head"][3, 0] = 0
    mask["neuron"] = (torch.rand(mask["neuron"].shape, generator=g) > 0.4).float()
    return mask


def plan_of(mask: dict[str, torch.Tensor], form: str = "per-layer") -> ExtractionPlan:
    layers = []
    for l in range(mask["block"].shape[0]):
        if mask["block"][l]:
            layer = LayerPlan(l, attn=bool(mask["attn"][l]), mlp=bool(mask["mlp"][l]))
            if "head" in mask:
                layer.units["head"] = torch.nonzero(mask["head"][l]).flatten().tolist()
            layer.units["neuron"] = torch.nonzero(mask["neuron"][l]).flatten().tolist()
            layers.append(layer)
    return ExtractionPlan(layers, mask["block"].shape[0], form)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("text,kind,value", [
    ("0.5", "fraction", 0.5), ("50%", "fraction", 0.5), (0.75, "fraction", 0.75),
    ("12layers", "layers", 12), ("3 blocks", "layers", 3), ("80M", "parameters", 80e6),
    ("1.2B", "parameters", 1.2e9), ("123456", "parameters", 123456), ("300MB", "bytes", 300e6),
])
def test_targets_parse(text, kind, value):
    assert Target.parse(text) == Target(kind, value)


@pytest.mark.parametrize("text", ["0", "0%", "150%", "12heads", "", "-1", "abc"])
def test_unreadable_or_empty_targets_are_refused(text):
    with pytest.raises(TargetError):
        Target.parse(text)


def choose(posterior, totals, target, form="per-layer", multiple=1):
    return posterior.plan(target, totals, form, multiple)


def block_posterior(model, order: list[int]):
    logits = torch.zeros(len(order))
    for rank, layer in enumerate(order):
        logits[layer] = 3.0 - rank
    return posterior_for(model, {"block": logits})


def test_blocks_are_removed_least_likely_first():
    model = tiny_model("llama")
    posterior = block_posterior(model, [2, 0, 3, 1])
    totals = ModelTotals.of(model)
    assert choose(posterior, totals, "3layers").kept_layers == [0, 2, 3]
    assert choose(posterior, totals, "0.5").kept_layers == [0, 2]
    assert choose(posterior, totals, "1layers").kept_layers == [2]
    block = count_parameters(decoder_layers(model)[0])
    total = count_parameters(model)
    assert choose(posterior, totals, str(total - block)).kept_layers == [0, 2, 3]
    assert choose(posterior, totals, str(total - block - 1)).kept_layers == [0, 2]
    assert choose(posterior, totals, f"{(total - 2 * block) * 4 / 1e6}MB").kept_layers == [0, 2]


@pytest.mark.parametrize("target", ["0layers", "5layers", "10", "0.01MB"])
def test_impossible_targets_are_refused(target):
    model = tiny_model("llama")
    with pytest.raises(TargetError):
        choose(block_posterior(model, [0, 1, 2, 3]), ModelTotals.of(model), target)


def test_extracted_model_equals_the_hard_gated_model(family, ids):
    model = tiny_model(family)
    gated = gate(model, GateConfig(units=width_units(family)))
    mask = random_mask(gated)
    with gated.gates_set(mask):
        expected = gated(input_ids=ids).logits
    gated.remove()
    small = extract_model(model, plan_of(mask))
    assert torch.allclose(small(input_ids=ids).logits, expected, atol=1e-5)
    assert len(decoder_layers(small)) == 3 and len(decoder_layers(model)) == 4, "the original is untouched"


def test_depth_only_extraction_is_bit_exact(family, ids):
    model = tiny_model(family)
    gated = gate(model, GateConfig(units=("block",)))
    with gated.gates_set({"block": torch.tensor([1.0, 0.0, 1.0, 0.0])}):
        expected = gated(input_ids=ids).logits
    gated.remove()
    small = extract_model(model, ExtractionPlan([LayerPlan(0), LayerPlan(2)], 4))
    assert torch.equal(small(input_ids=ids).logits, expected)
    idx = [m.layer_idx for b in decoder_layers(small) for m in b.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == [0, 1]


def test_per_layer_config_fields_are_sliced():
    model = tiny_model("qwen2")
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    small = extract_model(model, ExtractionPlan([LayerPlan(1), LayerPlan(2)], 4))
    assert small.config.layer_types == ["full_attention", "sliding_attention"]


def _run_without_bayesprune(script: str, cwd) -> None:
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_uniform_model_loads_and_generates_without_bayesprune(family, tmp_path, tokenizer):
    model = tiny_model(family)
    heads = [1] if family != "gpt2" else None
    plan = ExtractionPlan([LayerPlan(1, {"head": heads, "neuron": [0, 5, 7]}),
                           LayerPlan(3, {"head": heads, "neuron": [2, 3, 40]})], 4, "uniform")
    small = extract_model(model, plan)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    out = save_extracted(small, tokenizer, tmp_path / "small", plan.record())
    torch.save({"ids": ids, "logits": small(input_ids=ids).logits}, tmp_path / "expected.pt")
    _run_without_bayesprune(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        AutoTokenizer.from_pretrained({str(out)!r})
        e = torch.load({str(tmp_path / 'expected.pt')!r})
        assert torch.allclose(m(input_ids=e["ids"]).logits, e["logits"], atol=1e-5)
        a = m.generate(e["ids"], max_new_tokens=5, do_sample=False, use_cache=True)
        b = m.generate(e["ids"], max_new_tokens=5, do_sample=False, use_cache=False)
        assert torch.equal(a, b), (a, b)
        assert "bayesprune" not in sys.modules
    """, tmp_path)
    assert json.loads((out / "bayesprune_extraction.json").read_text())["kept_layers"] == [1, 3]


def test_per_layer_model_round_trips_through_load_pruned(family, tmp_path, ids, tokenizer):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

    from bayesprune.inputs.pretrained import load_model

    model = tiny_model(family)
    gated = gate(model, GateConfig(units=width_units(family)))
    mask = random_mask(gated, seed=1)
    gated.remove()
    small = extract_model(model, plan_of(mask))
    out = save_extracted(small, tokenizer, tmp_path / "small", {})
    config = json.loads((out / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == 3 and config["per_layer_config"]
    reloaded, _ = load_model(str(out))  # what `bayesprune evaluate` and lm-eval read
    assert torch.equal(reloaded(input_ids=ids).logits, small(input_ids=ids).logits)
    assert {"skip": ["self_attn" if family != "gpt2" else "attn"]}.items() <= config["per_layer_config"]["1"].items()
    loaded = load_pruned(out)
    assert torch.equal(loaded(input_ids=ids).logits, small(input_ids=ids).logits)
    a = loaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    b = loaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(a, b), "a skipped attention branch keeps the cache length right"
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        AutoModelForCausalLM.from_pretrained(out)


def test_a_plan_gives_back_the_hard_gates_it_was_made_from(family):
    gated = gate(tiny_model(family), GateConfig(units=width_units(family)))
    mask = random_mask(gated)
    back = plan_of(mask).gates(gated.kinds, gated.values.units)
    expected = {k: v.clone() for k, v in mask.items()}  # units under a closed block or branch read as off
    for kind, branch in (("head", "attn"), ("neuron", "mlp")):
        if kind in expected:
            expected[kind] *= (mask["block"] * mask[branch])[:, None]
    for branch in ("attn", "mlp"):
        expected[branch] *= mask["block"]
    assert set(back) == set(expected) and all(torch.equal(back[k], expected[k]) for k in expected)


def random_amplitudes(gated, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.5 + torch.rand(gated.values.shape(k), generator=g) for k in gated.kinds if k != "block"}


def test_folded_amplitudes_give_the_hard_gated_model_with_amplitudes(family, ids, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "original")
    gated = gate(model, GateConfig(units=width_units(family)))
    mask, amplitudes = random_mask(gated), random_amplitudes(gated)
    with torch.no_grad(), gated.gates_set(mask, amplitudes):
        expected = gated(input_ids=ids).logits
    gated.remove()
    plan = plan_of(mask).fold(amplitudes)
    small = extract_model(model, plan)
    with torch.no_grad():
        assert torch.allclose(small(input_ids=ids).logits, expected, atol=1e-4)
    out = extract_streaming(tmp_path / "original", plan, tmp_path / "streamed", plan.record())
    streamed = load_file(out / "model.safetensors")
    assert all(torch.equal(small.state_dict()[k], streamed[k]) for k in streamed)
    assert plan.record()["amplitudes_folded"]


def test_streaming_extraction_writes_what_the_in_memory_path_builds(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "original")
    gated = gate(model, GateConfig(units=width_units(family)))
    plan = plan_of(random_mask(gated, seed=2))
    gated.remove()
    out = extract_streaming(tmp_path / "original", plan, tmp_path / "streamed", {"kept": plan.kept_layers})
    streamed = load_file(out / "model.safetensors")
    built = {k: v for k, v in extract_model(model, plan).state_dict().items() if k in streamed}
    assert set(built) == set(streamed) and all(torch.equal(built[k], streamed[k]) for k in built)
    assert load_pruned(out).config.num_hidden_layers == 3


def width_posterior(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gated = gate(model, GateConfig(units=("block", "head", "neuron")))
    logits = {k: torch.randn(gated.values.shape(k), generator=g) * 3 for k in gated.kinds}
    gated.remove()
    return posterior_for(model, logits)


@pytest.mark.parametrize("form", ["per-layer", "uniform"])
@pytest.mark.parametrize("target", ["0.75", "0.5", "0.3"])
def test_chosen_plans_fit_the_target_and_report_their_real_size(form, target):
    model = tiny_model("llama")
    posterior = width_posterior(model)
    plan = choose(posterior, ModelTotals.of(model), target, form)
    small = extract_model(model, plan)
    decoder = sum(count_parameters(b) for b in decoder_layers(small))
    assert plan.decoder_parameters == decoder and plan.parameters == count_parameters(small)
    assert plan.fraction <= float(target) + 1e-9
    if form == "per-layer":
        head = posterior.sizes.unit["head"][0].item()
        assert float(target) - plan.fraction <= head / (plan.decoder_parameters / plan.fraction), \
            "the budget is filled to within one head group"
    else:
        assert len({(len(l.kept("head")), len(l.kept("neuron"))) for l in plan.layers}) == 1
        assert all(l.attn and l.mlp for l in plan.layers)


def test_per_layer_choice_prefers_probable_units():
    model = tiny_model("llama")
    posterior = width_posterior(model, seed=5)
    plan = choose(posterior, ModelTotals.of(model), "0.6")
    p = posterior.inclusion_mean(point=True)["neuron"]
    for layer in plan.layers:
        if layer.kept("neuron"):
            dropped = [n for n in range(48) if n not in layer.kept("neuron")]
            if dropped:
                assert p[layer.index, layer.kept("neuron")].min() >= p[layer.index, dropped].max() - 1e-6


@pytest.mark.parametrize("form", ["per-layer", "uniform"])
def test_neuron_counts_round_to_a_multiple(form):
    model = tiny_model("llama")
    plan = choose(width_posterior(model), ModelTotals.of(model), "0.6", form, multiple=8)
    assert all(len(l.kept("neuron")) % 8 == 0 for l in plan.layers if l.kept("neuron"))


def test_uniform_target_below_one_head_and_neuron_is_refused_and_writes_nothing(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(TargetError, match="smallest uniform"):
        choose(width_posterior(model), ModelTotals.of(model), "0.01", "uniform")


def test_existing_output_is_not_overwritten(tmp_path, tokenizer):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "keep.txt").write_text("mine")
    small = extract_model(tiny_model("llama"), ExtractionPlan([LayerPlan(0)], 4))
    with pytest.raises(FileExistsError):
        save_extracted(small, tokenizer, tmp_path / "small", {})
    assert (tmp_path / "small" / "keep.txt").read_text() == "mine"
