import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import bayesprune as bp
from bayesprune.baselines import sleb_scores
from bayesprune.run.cli import main
from bayesprune.core.likelihood import calibration_nll, next_token_nll
from bayesprune.core.removal import conditional_depth_search, removal_scores, swap_search, win_shares

from .conftest import TINY_CONFIGS, VOCAB, tiny_model
from .test_cli import FIT_ARGS


def _windows(count: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def test_a_hard_zero_block_gate_skips_the_block_and_gives_the_same_logits(family):
    model = tiny_model(family)
    gated = bp.gate(model, bp.GateConfig(units=("block",)))
    ids = _windows(2)
    calls = []
    handle = gated.model.get_submodule(bp.core.architectures.architecture_of(model).layers)[1].wrapped \
        .register_forward_hook(lambda *args: calls.append(1))
    gated(input_ids=ids)  # a first call teaches each wrapper what its block returns
    off = torch.ones(4)
    off[1] = 0
    with torch.no_grad():
        with gated.gates_set({"block": off.requires_grad_()}):
            computed = gated(input_ids=ids, use_cache=False).logits
        calls.clear()
        with gated.gates_set({"block": off.detach()}):
            skipped = gated(input_ids=ids, use_cache=False).logits
    assert not calls
    handle.remove()
    torch.testing.assert_close(skipped, computed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_engine_on_one_chunk_of_windows_is_slebs_greedy_removal(family):
    model = tiny_model(family)
    windows = _windows()
    gated = bp.gate(model, bp.GateConfig(units=("block",)))

    def nll_without(removed) -> float:  # the whole-corpus NLL per token, computed here independently
        on = torch.ones(4)
        on[list(removed)] = 0
        with gated.gates_set({"block": on}):
            return calibration_nll(gated, windows)

    removed = []
    for _ in range(3):
        rest = [b for b in range(4) if b not in removed]
        removed.append(min(rest, key=lambda b: nll_without(removed + [b])))
    dense = nll_without([])
    rises = [nll_without([b]) - dense for b in range(4)]
    search = conditional_depth_search(gated, windows, 3, "nll", chunk=8, progress=False)
    torch.testing.assert_close(removal_scores(gated, windows), torch.tensor(rises), rtol=1e-4, atol=1e-5)
    gated.remove()
    sleb = sleb_scores(model, windows, num_remove=3, progress=False)
    assert search.order == removed == torch.argsort(sleb)[:3].tolist()
    assert search.block_scores(4).tolist() == sleb.tolist()
    assert search.tokens == windows.numel() and search.evaluations == 4 + 3 + 2
    for step in search.steps:
        assert step.removed == min(step.scores, key=step.scores.get) and 0 < step.choice_probability <= 1


def test_uncertain_choices_are_judged_on_more_windows_and_distillation_scores_are_kl():
    model = tiny_model("llama")
    gated = bp.gate(model, bp.GateConfig(units=("block",)))
    windows = _windows(12)
    sure = conditional_depth_search(gated, windows, 2, "nll", chunk=4, confidence=1e-9, progress=False)
    assert sure.tokens == 4 * 24 and sure.evaluations == 4 + 3  # any choice is sure enough: one chunk
    unsure = conditional_depth_search(gated, windows, 2, "nll", chunk=4, confidence=1.0, progress=False)
    assert unsure.evaluations > sure.evaluations and unsure.tokens == 12 * 24
    kl = conditional_depth_search(gated, windows, 1, "distillation", chunk=12, progress=False)
    assert all(value > 0 for value in kl.steps[0].scores.values())
    proposal = torch.tensor([4.0, 3.0, 2.0, 1.0])  # only blocks 3 and 2 may go
    limited = conditional_depth_search(gated, windows, 2, "nll", proposal, candidates=2, chunk=12, progress=False)
    assert set(limited.steps[0].scores) == {2, 3} and limited.evaluations == 4
    gated.remove()
    with pytest.raises(ValueError, match="proposal"):
        conditional_depth_search(bp.gate(model, bp.GateConfig(units=("block",))), windows, 1, candidates=2)


def test_win_shares_follow_how_often_a_candidate_is_best():
    always = {0: torch.tensor([1.0, 1.0, 1.0]), 1: torch.tensor([2.0, 2.0, 2.0])}
    assert win_shares(always) == {0: 1.0, 1: 0.0}
    split = {0: torch.tensor([0.0, 2.0]), 1: torch.tensor([2.0, 0.0])}
    shares = win_shares(split)
    assert shares[0] == pytest.approx(0.5, abs=0.05) and shares[0] + shares[1] == pytest.approx(1.0)


def test_depth_command_ranks_a_run_and_depth_targets_cut_by_it(tiny_model_dir, corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "head,neuron", "--target", "none", *FIT_ARGS]) == 0
    assert main(["depth", str(run), "--removals", "2", "--windows", "6", "--chunk", "3", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "P(best)" in printed and "depth.json" in printed
    ranked = json.loads((run / "depth.json").read_text())
    assert len(ranked["order"]) == 2 and ranked["score"] == "nll" and ranked["tokens"] <= 6 * 32

    out = tmp_path / "small"
    assert main(["extract", str(run), "--target", "2layers", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["removed_layers"] == sorted(ranked["order"])
    assert record["depth_ranking"]["removed_in_order"] == ranked["order"]
    small = AutoModelForCausalLM.from_pretrained(out)
    assert small.config.num_hidden_layers == 2

    assert main(["extract", str(run), "--target", "1layers", "--out", str(tmp_path / "bad")]) == 2
    assert "--removals 3" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for bad, message in ((["--removals", "4"], "removals"), (["--windows", "2", "--chunk", "3"], "chunk")):
        assert main(["depth", str(run), *bad]) == 2
        assert message in capsys.readouterr().err
    assert json.loads((run / "depth.json").read_text()) == ranked  # refused requests change nothing
    (run / "depth.json").write_text("{}")
    assert main(["extract", str(run), "--target", "2layers", "--out", str(tmp_path / "bad")]) == 2
    assert "not a bayesprune depth ranking" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_protected_blocks_are_never_removed_and_bad_ones_are_refused():
    gated = bp.gate(tiny_model("llama"), bp.GateConfig(units=("block",)))
    search = conditional_depth_search(gated, _windows(), 2, chunk=8, protected=(0, 3), progress=False)
    assert sorted(search.order) == [1, 2]
    with pytest.raises(ValueError, match="removals must be in"):
        conditional_depth_search(gated, _windows(), 3, protected=(0, 3), progress=False)
    with pytest.raises(ValueError, match="protected blocks must be"):
        conditional_depth_search(gated, _windows(), 1, protected=(4,), progress=False)


def test_a_hard_zero_block_gate_under_a_kv_cache_generates_what_the_model_without_the_block_does(family):
    model = tiny_model(family)
    gated = bp.gate(model, bp.GateConfig(units=("block",)))
    ids = _windows(1, 10)
    with torch.no_grad():
        gated(input_ids=ids)
        off = torch.ones(4)
        off[2] = 0
        with gated.gates_set({"block": off}):
            routed = gated.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        with gated.unwrapped() as plain:
            view = bp.speculative.skip_blocks(plain, [2]).generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(routed, view)


def _six_blocks():
    torch.manual_seed(1)
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = 6
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    return bp.gate(model, bp.GateConfig(units=("block",)))


def _nll_without(gated, windows, removed) -> float:
    on = torch.ones(gated.num_layers)
    on[list(removed)] = 0
    with torch.no_grad(), gated.gates_set({"block": on}):
        logits = gated(input_ids=windows, use_cache=False).logits
    return float(next_token_nll(logits, windows).sum() / (windows.numel() - windows.shape[0]))


def test_a_swap_search_ends_on_a_set_no_single_swap_improves():
    gated, windows = _six_blocks(), _windows(8)
    exact = {s: _nll_without(gated, windows, s) for s in itertools.combinations(range(1, 6), 2)}
    worst = max(exact, key=exact.get)
    search = swap_search(gated, windows, worst, chunk=8, protected=(0,), progress=False)
    end = tuple(search.removed)
    assert search.start == list(worst) and search.local_optimum and search.steps
    assert exact[end] < exact[worst] and 0 not in end
    neighbours = [s for s in exact if len(set(s) & set(end)) == 1]
    assert len(neighbours) == 2 * 3 and all(exact[end] <= exact[s] for s in neighbours)
    for step in search.steps:
        assert step.score < step.before and 0 < step.choice_probability <= 1
    assert search.steps[-1].score == pytest.approx(exact[end], rel=1e-5)
    again = swap_search(gated, windows, end, chunk=8, protected=(0,), progress=False)
    assert again.removed == list(end) and again.local_optimum and not again.steps
    assert again.evaluations == 1 + 2 * 3 and again.tokens == windows.numel()
    capped = swap_search(gated, windows, worst, max_swaps=0, chunk=8, protected=(0,), progress=False)
    assert capped.removed == list(worst) and not capped.local_optimum and not capped.steps


def test_a_swap_search_refuses_bad_sets_before_scoring():
    gated = _six_blocks()
    for removed, message in (((0, 2), "unprotected"), ((7,), "unprotected"), ((), "unprotected")):
        with pytest.raises(ValueError, match=message):
            swap_search(gated, _windows(), removed, protected=(0,), progress=False)
    with pytest.raises(ValueError, match="max_swaps"):
        swap_search(gated, _windows(), (1,), max_swaps=-1, progress=False)
