import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bayesprune import GateConfig, GatePosterior, Target, TargetError, choose_layers, extract_layers, gate
from bayesprune.architectures import count_parameters, decoder_layers
from bayesprune.extract import save_extracted
from tests.conftest import VOCAB, tiny_model


def posterior_preferring(order: list[int], num_layers: int = 4) -> GatePosterior:
    """A posterior whose blocks are kept with decreasing probability in ``order``."""
    logits = torch.zeros(num_layers)
    for rank, layer in enumerate(order):
        logits[layer] = 3.0 - rank
    draws = {"block_logit": logits.expand(50, -1).clone()}
    sizes = {k: torch.ones(num_layers, dtype=torch.float64) for k in ("attn", "mlp", "other")}
    return GatePosterior(("block",), [f"model.layers.{i}" for i in range(num_layers)], draws, sizes)


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


def test_blocks_are_removed_least_likely_first():
    model = tiny_model("llama")
    posterior = posterior_preferring([2, 0, 3, 1])
    assert choose_layers(model, posterior, "3layers") == [0, 2, 3]
    assert choose_layers(model, posterior, "0.5") == [0, 2]
    assert choose_layers(model, posterior, "1layers") == [2]
    block = count_parameters(decoder_layers(model)[0])
    total = count_parameters(model)
    assert choose_layers(model, posterior, str(total - block)) == [0, 2, 3]
    assert choose_layers(model, posterior, str(total - block - 1)) == [0, 2]
    bytes_two_removed = (total - 2 * block) * 4
    assert choose_layers(model, posterior, f"{bytes_two_removed / 1e6}MB") == [0, 2]


@pytest.mark.parametrize("target", ["0layers", "5layers", "10", "0.01MB"])
def test_impossible_targets_are_refused(target):
    with pytest.raises(TargetError):
        choose_layers(tiny_model("llama"), posterior_preferring([0, 1, 2, 3]), target)


def test_extracted_model_equals_the_hard_gated_model(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    keep = [0, 2]
    small = extract_layers(model, keep)
    gated = gate(model, GateConfig(units=("block",)))
    with gated.gates_set({"block": torch.tensor([1.0, 0.0, 1.0, 0.0])}):
        expected = gated(input_ids=ids).logits
    assert torch.equal(small(input_ids=ids).logits, expected)
    gated.remove()
    assert len(decoder_layers(small)) == 2 and small.config.num_hidden_layers == 2
    assert len(decoder_layers(model)) == 4, "the original model is untouched"
    idx = [m.layer_idx for b in decoder_layers(small) for m in b.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == [0, 1]


def test_per_layer_config_fields_are_sliced():
    model = tiny_model("qwen2")
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    small = extract_layers(model, [1, 2])
    assert small.config.layer_types == ["full_attention", "sliding_attention"]


def test_saved_model_loads_and_generates_without_bayesprune(family, tmp_path, tokenizer):
    model = tiny_model(family)
    small = extract_layers(model, [1, 3])
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    expected = small(input_ids=ids).logits
    out = save_extracted(small, tokenizer, tmp_path / "small", {"kept_layers": [1, 3]})
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
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
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "bayesprune_extraction.json").read_text())["kept_layers"] == [1, 3]


def test_existing_output_is_not_overwritten(tmp_path, tokenizer):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_extracted(extract_layers(tiny_model("llama"), [0]), tokenizer, tmp_path / "small", {})
    assert (tmp_path / "small" / "keep.txt").read_text() == "mine"
