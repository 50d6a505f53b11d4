import math
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import bayesprune as bp
from bayesprune.core.architectures import decoder_layers
from bayesprune.core.likelihood import next_token_nll
from bayesprune.routing.router import BayesianRouter, Prediction
from bayesprune.routing.routed import (DENSE, RoutedModel, candidate_choice_scores, candidate_losses, candidate_sets, choose,
                                protected_blocks, route_prompts)

from .conftest import VOCAB, tiny_model
from .test_depth import _nll_without, _six_blocks
from .test_rundir import _rewrite_metadata


def _windows(count: int, length: int = 16, low: int = 0, high: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(low, high, (count, length), generator=torch.Generator().manual_seed(seed))


def _synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses linear in the features plus an error shared by all candidates and one of their own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    weights = torch.randn(12, 3, generator=torch.Generator().manual_seed(99))
    y = 0.3 * x @ weights + torch.randn(n, 1, generator=g) + 0.2 * torch.randn(n, 3, generator=g)
    return x, y + torch.tensor([0.0, 0.1, 0.2])


def _routing_setup(family: str = "llama"):
    gated = bp.gate(tiny_model(family), bp.GateConfig(units=("block",)))
    domains = {"low": _windows(6, low=0, high=VOCAB // 2), "high": _windows(6, low=VOCAB // 2, seed=1)}
    sets = {"low": [1], "high": [2]}
    features, losses = [], []
    for windows in domains.values():
        f, l = candidate_losses(gated, windows, sets, route_after=1, prompt_tokens=6, progress=False)
        features.append(f)
        losses.append(torch.stack([l[name] for name in sets], 1))
    router = BayesianRouter(list(sets)).fit(torch.cat(features), torch.cat(losses))
    return gated, router, sets


def test_the_router_s_90_percent_intervals_cover_90_percent_of_held_out_losses():
    x, y = _synthetic(1400)
    router = BayesianRouter(["a", "b", "c"]).fit(x[:400], y[:400])
    prediction = router.predict(x[400:])
    covered = ((y[400:] >= prediction.lower) & (y[400:] <= prediction.upper)).float().mean().item()
    assert 0.87 < covered < 0.93
    torch.testing.assert_close(prediction.best.sum(1), torch.ones(1000))
    assert (prediction.regret >= 0).all()
    # the shared error cancels: the choice is right far more often than the losses are predicted
    assert (prediction.mean.argmin(1) == y[400:].argmin(1)).float().mean() > 0.5
    assert router.alpha in router.evidence and router.evidence[router.alpha] == max(router.evidence.values())


def test_the_router_refuses_mismatched_data_and_predicting_unfitted():
    x, y = _synthetic(20)
    with pytest.raises(ValueError, match="distinct candidate names"):
        BayesianRouter(["a", "a", "b"])
    with pytest.raises(ValueError, match=r"\(n, 2\) losses"):
        BayesianRouter(["a", "b"]).fit(x, y)
    with pytest.raises(RuntimeError, match="fit the router"):
        BayesianRouter(["a", "b", "c"]).predict(x)


def _prediction(best, regret, mean) -> Prediction:
    mean = torch.tensor([mean])
    return Prediction(mean, mean - 1, mean + 1, torch.tensor([best]), torch.tensor([regret]), 0.9)


def test_choose_routes_when_sure_or_cheap_to_be_wrong_and_otherwise_skips_what_the_likely_sets_share():
    sets = {"a": [2, 3, 4], "b": [3, 4, 5], "c": [6, 7, 8]}
    sure = choose(_prediction([0.95, 0.05, 0.0], [0.1, 0.3, 0.5], [1.0, 1.2, 1.5]), sets)
    assert sure.skipped == (2, 3, 4) and sure.candidate == "a"
    near_tie = choose(_prediction([0.5, 0.5, 0.0], [0.01, 0.01, 0.5], [1.0, 1.01, 1.5]), sets)
    assert near_tie.candidate == "a"
    unsure = choose(_prediction([0.6, 0.35, 0.05], [0.1, 0.2, 0.5], [1.0, 1.1, 1.5]), sets)
    assert unsure.candidate is None and unsure.skipped == (3, 4)
    dense = choose(_prediction([0.5, 0.0, 0.5], [0.1, 0.5, 0.1], [1.0, 1.5, 1.0]), sets)
    assert dense.skipped == ()
    assert choose(_prediction([0.4, 0.3, 0.3], [0.5, 0.5, 0.5], [1.0, 1.1, 1.2]), sets, 1.0, math.inf).skipped == (2, 3, 4)


def test_candidate_sets_leave_the_protected_blocks_and_merge_domains_that_agree():
    gated = bp.gate(tiny_model("llama"), bp.GateConfig(units=("block",)))
    same = _windows(8)
    sets = candidate_sets(gated, {"a": same, "b": same, "c": _windows(8, seed=5)}, skipped=1, route_after=1,
                          chunk=8, progress=False)
    assert any({"a", "b"} <= set(name.split("+")) for name in sets)
    assert sorted(d for name in sets for d in name.split("+")) == ["a", "b", "c"]
    assert all(blocks in ([1], [2]) for blocks in sets.values()) and len(set(map(tuple, sets.values()))) == len(sets)
    assert protected_blocks(4, 1) == (0, 3)
    with pytest.raises(ValueError, match="route_after must leave blocks"):
        protected_blocks(4, 3)


def test_swapped_candidate_sets_are_local_optima_of_their_domains_windows():
    gated, windows = _six_blocks(), {"a": _windows(8, seed=2), "b": _windows(8, seed=3)}
    greedy = candidate_sets(gated, windows, skipped=2, route_after=1, chunk=8, progress=False)
    swapped = candidate_sets(gated, windows, skipped=2, route_after=1, chunk=8, max_swaps=4, progress=False)
    for domain, w in windows.items():
        before, after = _own(greedy, domain), _own(swapped, domain)
        end = _nll_without(gated, w, after)
        assert end <= _nll_without(gated, w, before) and not {0, 5} & set(after)
        assert all(end <= _nll_without(gated, w, [b for b in after if b != out] + [into])
                   for out in after for into in range(1, 5) if into not in after)
    with pytest.raises(ValueError, match="max_swaps"):
        candidate_sets(gated, windows, skipped=2, max_swaps=-1, progress=False)


def _own(sets: dict[str, list[int]], domain: str) -> list[int]:
    return next(blocks for name, blocks in sets.items() if domain in name.split("+"))


def test_candidate_losses_are_the_hard_gated_networks_continuation_nll_and_features_the_hidden_state_read():
    model = tiny_model("llama")
    gated = bp.gate(model, bp.GateConfig(units=("block",)))
    windows = _windows(3)
    features, losses = candidate_losses(gated, windows, {"one": [1]}, route_after=1, prompt_tokens=5, progress=False)
    with torch.no_grad():
        dense = gated(input_ids=windows, output_hidden_states=True)
        off = torch.tensor([1.0, 0.0, 1.0, 1.0])
        with gated.gates_set({"block": off}):
            skipped = gated(input_ids=windows).logits
    torch.testing.assert_close(features, dense.hidden_states[1][:, :5].mean(1))
    torch.testing.assert_close(losses[DENSE], next_token_nll(dense.logits[:, 4:], windows[:, 4:]) / 11)
    torch.testing.assert_close(losses["one"], next_token_nll(skipped[:, 4:], windows[:, 4:]) / 11)


def test_choice_scores_are_the_summed_log_likelihood_of_each_choice_after_the_context(tokenizer):
    model = tiny_model("llama")
    gated = bp.gate(model, bp.GateConfig(units=("block",)))
    items = [{"context": "the king is dead", "choices": ["long live", "the queen", "a b c d", "xyz"], "answer": 0}]
    features, scores = candidate_choice_scores(gated, tokenizer, items, {"one": [2]}, route_after=1, progress=False)
    context = tokenizer("the king is dead", add_special_tokens=False)["input_ids"]
    choice = tokenizer(" the queen", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + choice])
    with torch.no_grad():
        log_probs = gated(input_ids=ids).logits[0, :-1].log_softmax(-1)
    expected = sum(log_probs[len(context) - 1 + i, t] for i, t in enumerate(choice))
    assert scores[DENSE].shape == (1, 4) and features.shape == (1, 32)
    torch.testing.assert_close(scores[DENSE][0, 1], expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2"])
def test_a_routed_model_generates_what_its_route_s_sub_network_does_and_never_runs_the_skipped_block(family):
    gated, router, sets = _routing_setup(family)
    routed = RoutedModel(gated, router, sets, route_after=1, confidence=0.5, tolerance=math.inf)
    ids = _windows(1, 8, seed=3)
    route = routed.route(ids)
    calls = {i: 0 for i in range(4)}
    handles = [block.wrapped.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(decoder_layers(gated.model))]
    with torch.no_grad():
        out = routed.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for handle in handles:
        handle.remove()
    assert routed.last_route.skipped == route.skipped and len(route.skipped) == 1
    assert calls[route.skipped[0]] == 0 and all(calls[i] == 6 for i in range(4) if i not in route.skipped)
    routed.remove()
    with torch.no_grad(), gated.unwrapped() as plain:
        assert torch.equal(out, bp.speculative.skip_blocks(plain, route.skipped).generate(ids, max_new_tokens=6, do_sample=False,
                                                                              pad_token_id=0))


def test_a_routed_forward_equals_the_hard_gated_network_and_routes_each_prompt_afresh():
    gated, router, sets = _routing_setup()
    routed = RoutedModel(gated, router, sets, route_after=1, confidence=0.5, tolerance=math.inf)
    low, high = _windows(1, 8, high=VOCAB // 2, seed=7), _windows(1, 8, low=VOCAB // 2, seed=8)
    for ids in (low, high, low):
        with torch.no_grad():
            logits = routed(input_ids=ids).logits
            route = routed.last_route
            off = torch.ones(4)
            off[list(route.skipped)] = 0
            routed.remove()
            with gated.gates_set({"block": off}):
                expected = gated(input_ids=ids).logits
        torch.testing.assert_close(logits, expected)
        assert routed.route(ids).skipped == route.skipped
        routed = RoutedModel(gated, router, sets, route_after=1, confidence=0.5, tolerance=math.inf)
    longer = [torch.cat([w, w[:, :1]], 1) for w in (low, high)]  # features of the first 8 tokens
    features = torch.cat([candidate_losses(gated, w, {}, 1, 8, progress=False)[0] for w in longer])
    assert [r.skipped for r in route_prompts(router, features, sets, 0.5, math.inf)] == \
        [routed.route(low).skipped, routed.route(high).skipped]


def test_a_routed_prompt_s_sub_network_is_written_as_a_plain_checkpoint(tmp_path):
    gated, router, sets = _routing_setup()
    routed = RoutedModel(gated, router, sets, route_after=1, confidence=0.5, tolerance=math.inf)
    ids = _windows(1, 8, seed=3)
    with torch.no_grad():
        logits = routed(input_ids=ids).logits
    routed.save_route(ids, None, tmp_path / "routed")
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "routed").eval()
    assert small.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError):
        routed.save_route(ids, None, tmp_path / "routed")


def test_a_routed_model_refuses_sets_that_skip_what_the_router_reads_and_unknown_candidates():
    gated, router, sets = _routing_setup()
    with pytest.raises(ValueError, match="no set may skip the blocks before route_after"):
        RoutedModel(gated, router, {"low": [0], "high": [2]}, route_after=1)
    with pytest.raises(ValueError, match="the router predicts"):
        RoutedModel(gated, router, {"other": [1], "high": [2]}, route_after=1)
    with pytest.raises(ValueError, match="confidence must be"):
        RoutedModel(gated, router, sets, route_after=1, confidence=0)


def test_a_saved_router_routes_as_before_and_foreign_or_mismatched_files_are_refused(tmp_path):
    gated, router, sets = _routing_setup()
    routed = RoutedModel(gated, router, sets, route_after=1, confidence=0.7, tolerance=0.05)
    path = routed.save(tmp_path / "router.safetensors")
    with pytest.raises(FileExistsError):
        routed.save(path)
    routed.remove()
    loaded = RoutedModel.load(path, gated)
    assert (loaded.sets, loaded.route_after, loaded.confidence, loaded.tolerance) == (sets, 1, 0.7, 0.05)
    features = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    for a, b in zip(vars(router.predict(features)).values(), vars(loaded.router.predict(features)).values()):
        assert a == b if isinstance(a, float) else torch.equal(a, b)
    loaded.remove()
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not written by bayesprune"):
        RoutedModel.load(foreign, gated)
    for damage, message in (({"confidence": 1.5}, "confidence must be a finite number in [0, 1], got 1.5"),
                            ({"sets": {"a": ["x"]}}, "sets['a'][0] must be an integer ≥ 0"),
                            ({"router": {"names": ["a"]}}, "router lacks 'level'")):
        damaged = tmp_path / "damaged.safetensors"
        shutil.copy(path, damaged)
        _rewrite_metadata(damaged, **damage)
        with pytest.raises(ValueError, match=re.escape(f"{damaged} is a damaged bayesprune router file: {message}")):
            RoutedModel.load(damaged, gated)
    tensors = load_file(str(path))
    save_file(tensors | {"coefficients": tensors["coefficients"][:-1]}, str(damaged),
              metadata=safe_open(str(path), "pt").metadata())
    with pytest.raises(ValueError, match="router's coefficients should be finite of shape"):
        RoutedModel.load(damaged, gated)
    config = type(gated.model.config)(**{**gated.model.config.to_dict(), "hidden_size": 64})
    wider = bp.gate(AutoModelForCausalLM.from_config(config), bp.GateConfig(units=("block",)))
    with pytest.raises(ValueError, match="routes on 32 features"):
        RoutedModel.load(path, wider)


def test_block_posteriors_per_domain_propose_the_blocks_each_domain_s_search_weighs():
    model = tiny_model("llama")
    ids = _windows(2)
    expected = model(input_ids=ids).logits
    gated = bp.gate(model, bp.GateConfig(units=("block",)))
    domains = {"low": _windows(6, low=0, high=VOCAB // 2), "high": _windows(6, low=VOCAB // 2, seed=1)}
    posteriors = bp.routing.domain_block_posteriors(gated, domains, steps=3, progress=False)
    assert set(posteriors) == set(domains)
    torch.testing.assert_close(gated(input_ids=ids).logits, expected)  # the fits leave the gates open
    from bayesprune.routing.routed import block_proposal

    for name, posterior in posteriors.items():
        proposal = block_proposal(posterior, 3)
        assert proposal.shape == (4,) and ((0 <= proposal) & (proposal <= 1)).all()
        # with one candidate per step the search can only take the posterior's least-needed free block
        sets = candidate_sets(gated, {name: domains[name]}, 1, route_after=1, posteriors={name: posterior},
                              candidates=1, chunk=2, progress=False)
        assert sets == {name: [min((1, 2), key=lambda b: float(proposal[b]))]}
    with pytest.raises(ValueError, match="a posterior for every domain"):
        candidate_sets(gated, domains, 1, route_after=1, posteriors={"low": posteriors["low"]}, progress=False)
    with pytest.raises(ValueError, match="block gates only"):
        bp.routing.domain_block_posteriors(bp.gate(tiny_model("llama"), bp.GateConfig(units=("block", "head"))), domains)


def test_fit_routed_model_and_its_held_out_check_score_every_set_unrouted():
    gated = bp.gate(tiny_model("llama"), bp.GateConfig(units=("block",)))
    domains = {"low": _windows(10, low=0, high=VOCAB // 2), "high": _windows(10, low=VOCAB // 2, seed=1)}
    routed = bp.routing.fit_routed_model(gated, domains, skipped=1, route_after=1, prompt_tokens=6, search_windows=4,
                                 train_windows=6, chunk=2, progress=False)
    assert all(len(blocks) == 1 and blocks[0] in (1, 2) for blocks in routed.sets.values())
    held_out = {"low": _windows(4, low=0, high=VOCAB // 2, seed=5)}
    report = bp.routing.held_out_check(routed, held_out, prompt_tokens=6, progress=False)["low"]
    with routed.paused():
        _, losses = candidate_losses(gated, held_out["low"], {**routed.sets, "one": [1], "two": [2]}, 1, 6,
                                     progress=False)
    assert report["dense"] == pytest.approx(float(losses[DENSE].mean()))
    for name, blocks in routed.sets.items():
        assert report["sets"][name] == pytest.approx(float(losses[name].mean()))
    assert all(abs(report["dense"] - float(losses[name].mean())) > 1e-4 for name in ("one", "two"))
    # the routes' loss is, prompt by prompt, that of the set each one skips
    with routed.paused():
        features = candidate_losses(gated, held_out["low"], {}, 1, 6, progress=False)[0]
    routes = route_prompts(routed.router, features, routed.sets, routed.confidence, routed.tolerance)
    by_set = {(): losses[DENSE], (1,): losses["one"], (2,): losses["two"]}
    assert report["routed"] == pytest.approx(float(torch.stack([by_set[r.skipped][i] for i, r in enumerate(routes)]).mean()))
    with pytest.raises(ValueError, match="more than search_windows=10"):
        bp.routing.fit_routed_model(gated, domains, skipped=1, route_after=1, prompt_tokens=6, search_windows=10, progress=False)
