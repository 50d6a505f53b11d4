import copy
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import bayesprune as bp
from bayesprune.speculative import decoding as sp
from bayesprune.core.architectures import decoder_layers
from bayesprune.run.cli import main
from bayesprune.run.drafts import load_draft, write_draft
from bayesprune.cut.extraction import EXTRACTION_FILE

from .conftest import VOCAB, tiny_model
from .test_cli import FIT_ARGS


def _prompt(length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB - 1, (1, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, new: int = 24, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)


def test_a_skip_block_draft_is_the_hard_gated_target_and_shares_its_weights(family):
    target = tiny_model(family)
    skipped = [1, 2]
    draft = sp.skip_blocks(target, skipped)
    weights = {p.data_ptr() for p in target.parameters()}
    assert {p.data_ptr() for p in draft.parameters()} <= weights
    assert len(decoder_layers(target)) == 4 and target.config.num_hidden_layers == 4

    ids = _prompt(16)
    gated = bp.gate(copy.deepcopy(target), bp.GateConfig(units=("block",)))
    with torch.no_grad(), gated.gates_set({"block": torch.tensor([1.0, 0.0, 0.0, 1.0])}):
        expected = gated(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, expected)
    # Its own KV cache is right: cached decoding equals recomputing every step.
    assert torch.equal(_greedy(draft, ids, 12), _greedy(draft, ids, 12, use_cache=False))
    # The target is untouched: same logits, its blocks keep their own indices.
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, gated.remove()(ids).logits)
    assert [getattr(m, "layer_idx") for m in target.modules() if hasattr(m, "layer_idx")] == \
        [getattr(m, "layer_idx") for m in tiny_model(family).modules() if hasattr(m, "layer_idx")]


def test_assisted_generation_keeps_the_target_greedy_output_and_counts_acceptance(family):
    target = tiny_model(family)
    ids = _prompt()
    plain = _greedy(target, ids)
    draft = sp.configure_draft(sp.skip_blocks(target, [2]), gamma=3)
    with sp.count_acceptance(target) as through_generate:
        assert torch.equal(_greedy(target, ids, assistant_model=draft), plain)
    with sp.direct_drafting(target), sp.count_acceptance(target) as direct:
        assert torch.equal(_greedy(target, ids, assistant_model=draft), plain)
    assert "_get_candidate_generator" not in target.__dict__
    # Both ways of drafting propose the same tokens, so the target accepts the same ones.
    assert through_generate.to_dict() == direct.to_dict()
    assert through_generate.rounds > 0 and max(through_generate.drafted) == 3
    assert sum(through_generate.accepted) + through_generate.rounds == plain.shape[1] - ids.shape[1]


def test_a_perfect_draft_is_always_accepted_and_a_trimmed_head_keeps_the_output():
    target = tiny_model("llama")
    ids = _prompt()
    plain = _greedy(target, ids, 20)
    twin = sp.configure_draft(copy.deepcopy(target), gamma=4)
    with sp.direct_drafting(target), sp.count_acceptance(target) as counts:
        assert torch.equal(_greedy(target, ids, 20, assistant_model=twin), plain)
    assert counts.alpha == 1.0 and counts.tokens_per_call == 5.0

    vocabulary = torch.arange(0, VOCAB, 3)
    trimmed = sp.configure_draft(sp.trim_vocabulary(sp.skip_blocks(target, [1]), vocabulary), gamma=2)
    with sp.count_acceptance(target) as counts:
        assert torch.equal(_greedy(target, ids, 20, assistant_model=trimmed), plain)
    assert target.get_output_embeddings().weight.shape[0] == VOCAB  # the target's head is its own
    with torch.no_grad():
        logits = trimmed(ids).logits
        full = sp.skip_blocks(target, [1])(ids).logits
    torch.testing.assert_close(logits[..., vocabulary], full[..., vocabulary])
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[vocabulary] = False
    assert torch.isneginf(logits[..., outside]).all()


def test_vocabulary_share_and_acceptance_from_logits():
    tokens = torch.tensor([5] * 50 + [7] * 30 + [9] * 15 + [11] * 5)
    assert sp.vocabulary_for_share(tokens, 0.5, 20).tolist() == [5]
    assert sp.vocabulary_for_share(tokens, 0.8, 20, always=(0,)).tolist() == [0, 5, 7]
    assert sp.vocabulary_for_share(tokens, 1.0, 20).tolist() == [5, 7, 9, 11]
    with pytest.raises(ValueError, match="share"):
        sp.vocabulary_for_share(tokens, 1.5, 20)

    logits = torch.randn(2, 6, 20)
    same = sp.acceptance(logits, logits)
    assert same["greedy"] == 1.0 and same["sampling"] == pytest.approx(1.0) and same["tokens"] == 12
    other = sp.acceptance(logits, torch.randn(2, 6, 20))
    assert 0 < other["sampling"] < 1
    p, q = logits.softmax(-1), torch.randn(2, 6, 20).softmax(-1)
    assert sp.acceptance(p.log(), q.log())["sampling"] == pytest.approx(torch.minimum(p, q).sum(-1).mean().item())


def test_the_expected_speedup_formula():
    # Leviathan et al. 2023: (1 − α^(γ+1)) / ((1 − α)(γc + 1)).
    assert sp.expected_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / (0.2 * 1.4))
    assert sp.expected_speedup(0.0, 3, 0.2) == pytest.approx(1 / 1.6)
    assert sp.expected_speedup(1.0, 3, 0.0) == pytest.approx(4.0)
    assert sp.expected_speedup(0.8, 4, 0.1, verify_ratio=2.0) == pytest.approx((1 - 0.8 ** 5) / (0.2 * 2.4))
    gamma, speedup = sp.best_gamma(0.9, 0.02)
    assert gamma == 8 and speedup == pytest.approx(sp.expected_speedup(0.9, 8, 0.02))
    assert sp.best_gamma(0.3, 0.5)[0] == 1
    with pytest.raises(ValueError, match="gamma"):
        sp.expected_speedup(0.5, 0, 0.1)


def test_draft_command_writes_the_predicted_best_draft_for_plain_transformers(tiny_model_dir, corpus_dir, tmp_path,
                                                                              capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "head,neuron", "--target", "none", *FIT_ARGS]) == 0
    capsys.readouterr()
    out = tmp_path / "draft"
    assert main(["draft", str(run), "--out", str(out), "--sizes", "0.5,0.8", "--vocab-share", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "γ =" in printed and "0.8 of decoder parameters" in printed
    record = json.loads((out / "draft.json").read_text())
    rows = record["candidates"]
    assert rows[0] == record["chosen"] and rows[0]["predicted_speedup"] >= rows[1]["predicted_speedup"]
    for row in rows:
        assert 0 <= row["alpha_greedy"] <= 1 and 0 < row["cost_ratio"] and row["gamma"] >= 1
        assert row["predicted_speedup"] == pytest.approx(sp.expected_speedup(
            row["alpha_greedy"], row["gamma"], row["cost_ratio"], record["verify_ratio"][str(row["gamma"])]))

    plain_draft = AutoModelForCausalLM.from_pretrained(out)  # the uniform form needs nothing but transformers
    assert plain_draft.generation_config.num_assistant_tokens == record["chosen"]["gamma"]
    assert plain_draft.generation_config.num_assistant_tokens_schedule == "constant"
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = _prompt()
    plain = _greedy(target, ids)
    assert torch.equal(_greedy(target, ids, assistant_model=plain_draft), plain)
    draft = load_draft(out)
    assert isinstance(draft.get_output_embeddings(), sp.TrimmedHead)
    assert draft.get_output_embeddings().vocabulary.tolist() == record["vocabulary"]
    with bp.speculative.direct_drafting(target):
        assert torch.equal(_greedy(target, ids, assistant_model=draft), plain)
    written = (out / "draft.json").read_text()
    for damage, message in (({"chosen": {"target": "0.5", "gamma": 0}}, "chosen.gamma must be an integer ≥ 1, got 0"),
                            ({"vocabulary": [3, -1]}, "vocabulary must be a list of items each an integer ≥ 0 or null"),
                            ({"draft_dtype": "int4"}, "draft_dtype must be one of 'float32'")):
        (out / "draft.json").write_text(json.dumps(record | damage))
        with pytest.raises(ValueError, match=re.escape(f"{out / 'draft.json'} is a damaged bayesprune draft record: "
                                                       f"{message}")):
            load_draft(out)
    (out / "draft.json").write_text(written)

    assert main(["draft", str(run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    for bad, message in ((["--vocab-share", "1.5"], "vocabulary share"), (["--sizes", "9layers"], "block"),
                         (["--sizes", "half"], "cannot read target")):
        assert main(["draft", str(run), "--out", str(tmp_path / "bad"), *bad]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_direct_drafting_implements_what_the_installed_transformers_asks_of_a_candidate_generator():
    reads = sp.protocol_reads()  # read from this release's assisted-decoding source
    assert {"get_candidates", "update_candidate_strategy"} <= reads
    assert sp.protocol_gaps(sp.GreedyDraftCandidates) == []


def test_a_generator_missing_part_of_the_protocol_is_refused_by_name():
    class Bare:
        def get_candidates(self, input_ids, **kwargs):
            return input_ids, None

    assert "update_candidate_strategy" in sp.protocol_gaps(Bare)
    with pytest.raises(RuntimeError, match="update_candidate_strategy.*Bare does not implement"):
        sp.check_protocol(Bare)


def test_a_depth_ranked_draft_is_the_sub_network_whose_speed_up_was_predicted(tiny_model_dir, corpus_dir, tmp_path,
                                                                             capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "block", "--target", "none", *FIT_ARGS]) == 0
    assert main(["depth", str(run), "--removals", "2", "--windows", "6", "--chunk", "3", "--dtype", "float32"]) == 0
    # A depth ranking that removes other blocks than the posterior would: targets in blocks cut by it.
    posterior_removes = set(range(4)) - set(bp.GatePosterior.load(run / "posterior.safetensors").plan(
        "2layers", bp.ModelTotals.of(tiny_model("llama"))).kept_layers)
    depth = json.loads((run / "depth.json").read_text())
    depth["order"] = sorted(set(range(4)) - posterior_removes)[:2]
    (run / "depth.json").write_text(json.dumps(depth))
    capsys.readouterr()

    record = write_draft(run, tmp_path / "draft", sizes=("2layers",), progress=False)
    predicted, written = record["chosen"], json.loads((tmp_path / "draft" / EXTRACTION_FILE).read_text())
    assert predicted["removed_layers"] == written["removed_layers"] == sorted(depth["order"])
