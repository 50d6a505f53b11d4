import json
import math
import subprocess
import sys

import arviz as az
import bayesprune as bp
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bayesprune.cut.extraction import EXTRACTION_FILE
from bayesprune.inputs.pretrained import native_dtype
from bayesprune.run.cli import main

FIT_ARGS = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "256", "--eval-window", "64"]


def test_fit_extract_evaluate_round_trip(tiny_model_dir, corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "block", "--target", "2layers", *FIT_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0" in printed and "report.json" in printed
    for name in ("config.json", "checkpoint.safetensors", "posterior.safetensors", "posterior.nc",
                 "summary.csv", "forest.png", "inclusion.png", "thresholds.png", "size_curve.png", "report.json",
                 "extracted/config.json", "extracted/tokenizer.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert len(report["extracted"]["kept_layers"]) == 2
    assert report["extracted"]["parameters"] < report["dense"]["parameters"]
    assert report["config"]["fit"]["dtype"] == "auto" and report["compute_dtype"] == str(native_dtype()).split(".")[1]
    seconds = report["seconds"]  # where the wall time went: the phases add up to it, the fit's parts to the fit
    assert set(seconds) == {"load", "dense_evaluation", "fit", "fit_scan", "fit_steps", "summaries", "extraction",
                            "extracted_evaluation"} and min(seconds.values()) > 0
    assert seconds["fit_scan"] + seconds["fit_steps"] <= seconds["fit"]
    top = sum(v for k, v in seconds.items() if not k.startswith("fit_"))
    assert 0.9 * report["wall_seconds"] <= top <= report["wall_seconds"]
    assert f"; {report['wall_seconds']:,.0f} s in all" in printed
    joint = tmp_path / "joint"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(joint),
                 "--units", "head", "--weights", "joint", "--target", "none", *FIT_ARGS]) == 0
    assert json.loads((joint / "report.json").read_text())["compute_dtype"] == "float32"  # trained weights
    capsys.readouterr()

    small = tmp_path / "small"
    assert main(["extract", str(run), "--target", "0.5", "--out", str(small)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kept_layers"] == sorted(record["kept_layers"]) and len(record["kept_layers"]) == 2
    assert AutoModelForCausalLM.from_pretrained(small).config.num_hidden_layers == 2

    assert main(["evaluate", str(small), "--data", str(corpus_dir), "--eval-tokens", "256",
                 "--eval-window", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_scored"] == 4 * 63 and result["parameters"] == record["parameters"]
    assert result["file_bytes"] > 0

    # The same settings resume (nothing left to fit); different settings are refused.
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "block", "--target", "none", *FIT_ARGS]) == 0
    capsys.readouterr()
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "block", "--cost", "2", *FIT_ARGS]) == 2
    assert "fitted with other settings (cost.fixed: None → 2.0)" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["0layers", "9layers", "12heads", "1KB", "1GB"])
def test_impossible_targets_fail_cleanly_and_write_nothing(tiny_model_dir, corpus_dir, tmp_path, capsys, target):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "block", "--target", "none", *FIT_ARGS]) == 0
    capsys.readouterr()
    assert main(["extract", str(run), "--target", target, "--out", str(tmp_path / "small")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()


def test_width_run_extracts_both_forms(tiny_model_dir, corpus_dir, tmp_path, capsys):
    from bayesprune import load_pruned

    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "block,head,neuron", "--target", "0.6", *FIT_ARGS]) == 0
    assert "neuron" in capsys.readouterr().out
    assert (run / "width.png").is_file() and (run / "forest.png").is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["extracted"]["fraction_of_decoder"] <= 0.6 and len(report["widths"]) == 2 * 4
    assert load_pruned(run / "extracted").num_parameters() == report["extracted"]["parameters"]

    uniform = tmp_path / "uniform"
    assert main(["extract", str(run), "--target", "0.5", "--form", "uniform", "--out", str(uniform)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["form"] == "uniform" and record["fraction_of_decoder"] <= 0.5
    model = AutoModelForCausalLM.from_pretrained(uniform)
    assert model.num_parameters() == record["parameters"]
    in_memory = tmp_path / "in-memory"
    assert main(["extract", str(run), "--target", "0.5", "--form", "uniform", "--in-memory",
                 "--out", str(in_memory)]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == record["parameters"]
    assert main(["extract", str(run), "--target", "0.01", "--form", "uniform", "--out", str(tmp_path / "x")]) == 2
    assert "smallest uniform" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bad_inputs_get_clear_errors(tmp_path, capsys):
    assert main(["fit", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no model at" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["extract", str(tmp_path), "--target", "0.5", "--out", str(tmp_path / "s")]) == 2
    assert "not a bayesprune run directory" in capsys.readouterr().err
    assert main(["fit", "--units", "heads", "--out", str(tmp_path / "r")]) == 2
    assert "unknown unit kind" in capsys.readouterr().err
    assert main(["fit", "--cost", "nan", "--out", str(tmp_path / "r")]) == 2
    assert "finite" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_settings_and_targets_are_checked_before_any_weights_are_scored(tmp_path, capsys, monkeypatch):
    import bayesprune.run.fit_job as fit_job
    from tests.conftest import tiny_model

    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    monkeypatch.setattr(fit_job, "load_model", lambda *a: pytest.fail("weights were loaded"))
    assert main(["fit", "--model", str(gpt2), "--units", "head", "--out", str(tmp_path / "r")]) == 2
    assert "cannot gate heads" in capsys.readouterr().err
    assert main(["fit", "--model", str(gpt2), "--units", "neuron", "--target", "3layers",
                 "--out", str(tmp_path / "r")]) == 2
    assert "needs block, attn or mlp gates" in capsys.readouterr().err
    assert main(["fit", "--model", str(gpt2), "--target", "3 bananas", "--out", str(tmp_path / "r")]) == 2
    assert "cannot read target" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "bayesprune.run.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "extract" in done.stdout


def test_the_default_run_resizes_to_any_target_without_refitting(tiny_model_dir, corpus_dir, tmp_path, capsys):
    from bayesprune import load_pruned

    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--target", "0.6", *FIT_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "cost" in printed and "MB" in printed
    for name in ("posterior.safetensors", "size_curve.png", "thresholds.png", "inclusion.png", "width.png",
                 "report.json", "extracted/config.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["size_curve"][0]["fraction"] == 1.0 and report["extracted"]["cost"] > 0
    assert report["extracted"]["fraction_of_decoder"] <= 0.6 and report["extracted"]["amplitudes_folded"]
    for target in ("0.5", "0.3", "40%flops"):
        small = tmp_path / f"small-{target}"
        assert main(["extract", str(run), "--target", target, "--out", str(small)]) == 0
        record = json.loads(capsys.readouterr().out)
        kept = record["flop_fraction_of_decoder" if "flops" in target else "fraction_of_decoder"]
        wanted = bp_target(target)
        assert wanted - 0.1 < kept <= wanted and record["cost"] > 0
        assert load_pruned(small).config.num_hidden_layers == 4
    idata = az.from_netcdf(run / "posterior.nc")
    assert idata.posterior["neuron_inclusion"].dims == ("chain", "draw", "cost", "layer", "neuron")
    assert list(idata.posterior["layer"].values) == [f"model.layers.{i}" for i in range(4)]
    assert float(idata.posterior["kept_fraction"].sel(cost=0.0).mean()) == 1.0


def bp_target(text: str) -> float:
    from bayesprune.core.targets import Target

    return Target.parse(text).value


def test_a_bf16_source_is_cut_to_the_same_bytes_by_fit_and_extract_and_stays_bf16(tokenizer, corpus_dir, tmp_path,
                                                                                   capsys):
    """The fit computes in its own dtype (--dtype), but byte targets and written checkpoints use the stored dtype."""
    from safetensors import safe_open

    from tests.conftest import tiny_model

    source = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    run = tmp_path / "run"
    assert main(["fit", "--model", str(source), "--data", str(corpus_dir), "--out", str(run), "--target", "60KB",
                 *FIT_ARGS]) == 0
    capsys.readouterr()
    streamed = tmp_path / "streamed"
    assert main(["extract", str(run), "--target", "60KB", "--out", str(streamed)]) == 0
    record = json.loads(capsys.readouterr().out)
    fitted = json.loads((run / "report.json").read_text())["extracted"]
    assert fitted["parameters"] == record["parameters"] and record["parameters"] * 2 <= 60_000
    for folder in (run / "extracted", streamed):
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_a_bfloat16_fit_of_a_float32_model_scores_and_cuts_the_float32_weights(tiny_model_dir, corpus_dir, tmp_path,
                                                                                 capsys):
    """Dense and extracted models are the stored weights (adapters merged at full precision), not their bfloat16
    rounding: the fit's own extraction is ``extract --in-memory``'s, and the dense score is the float32 model's."""
    run, again = tmp_path / "run", tmp_path / "again"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run), "--target", "0.6",
                 "--units", "head,neuron", "--weights", "lora", "--lora-rank", "4", "--dtype", "bfloat16",
                 *FIT_ARGS]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["compute_dtype"] == "bfloat16"
    assert main(["extract", str(run), "--target", "0.6", "--out", str(again), "--in-memory"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tiny_model_dir), "--data", str(corpus_dir), "--eval-tokens", "256",
                 "--eval-window", "64"]) == 0
    dense = json.loads(capsys.readouterr().out)
    fitted, extracted = load_file(run / "extracted" / "model.safetensors"), load_file(again / "model.safetensors")
    assert fitted.keys() == extracted.keys() and all(torch.equal(fitted[k], extracted[k]) for k in fitted)
    assert all(v.dtype == torch.float32 for v in fitted.values())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in fitted.values())
    assert report["dense"]["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)


def test_unknown_devices_are_refused_before_loading(tiny_model_dir, tmp_path, capsys):
    assert main(["evaluate", str(tiny_model_dir), "--device", "tpu:9"]) == 2
    assert "unknown device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["fit", "--model", str(tiny_model_dir), "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
        assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_more_costs_per_step_than_windows_per_step_are_refused_before_loading(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["fit", "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "4",
                 "--costs-per-step", "8"]) == 2
    assert "lower cost.per_step" in capsys.readouterr().err and not out.exists()


ROUTER_ARGS = ["--skipped", "1", "--route-after", "1", "--seq-len", "16", "--prompt-tokens", "4",
               "--search-windows", "4", "--train-windows", "8", "--check-windows", "4", "--dtype", "float32"]


@pytest.fixture
def code_dir(tmp_path):
    """Four standard-library modules as text files: a second domain beside the plays."""
    import inspect
    import json as json_module
    import string
    import textwrap

    root = tmp_path / "code"
    root.mkdir()
    for module in (json_module, string, textwrap, inspect):
        (root / f"{module.__name__}.txt").write_text(inspect.getsource(module)[:6000])
    return root


def test_router_builds_checks_and_routes_a_prompt_to_a_checkpoint_that_generates_the_same(
        tiny_model_dir, corpus_dir, code_dir, tmp_path, capsys):
    router = tmp_path / "router.safetensors"
    assert main(["router", "--out", str(router), "--model", str(tiny_model_dir),
                 "--domains", f"{corpus_dir},{code_dir}", *ROUTER_ARGS, "--posterior-steps", "2",
                 "--max-swaps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "skips blocks" in printed and "coverage" in printed and f"wrote {router}" in printed
    from bayesprune.routing.routed import router_record

    record = router_record(router)
    assert all(len(blocks) == 1 and blocks[0] in (1, 2) for blocks in record["sets"].values())
    assert set(record["made"]["validation"]) == {corpus_dir.name, code_dir.name}
    for check in record["made"]["validation"].values():
        assert check["windows"] == 4 and 0 <= check["coverage"] <= 1 and 0 <= check["skipped"] <= 1
        assert all(math.isfinite(v) for v in (check["routed"], check["dense"], *check["sets"].values()))
    assert record["made"]["model"] == str(tiny_model_dir.resolve()) and record["made"]["posterior_steps"] == 2
    assert record["made"]["max_swaps"] == 2

    sub = tmp_path / "sub"
    assert main(["route", str(router), "--prompt", "To be, or not to be", "--max-new-tokens", "6",
                 "--out", str(sub)]) == 0
    routed = json.loads(capsys.readouterr().out)
    assert set(routed["probability"]) == set(record["sets"]) and routed["written"] == str(sub)
    small = AutoModelForCausalLM.from_pretrained(sub)
    assert small.config.num_hidden_layers == 4 - len(routed["skipped"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sub)
    ids = tokenizer("To be, or not to be", return_tensors="pt", add_special_tokens=False)["input_ids"]
    generated = small.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True) == routed["text"]

    weights = tiny_model_dir / "model.safetensors"  # the model the router records changes under it
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)
    assert main(["route", str(router), "--prompt", "hello", "--max-new-tokens", "0"]) == 2
    assert "has changed since" in capsys.readouterr().err
    assert main(["route", str(router), "--prompt", "hello", "--max-new-tokens", "0", "--model",
                 str(tiny_model_dir)]) == 0  # named on purpose


def test_router_inputs_get_clear_errors_and_nothing_is_written(tiny_model_dir, corpus_dir, tmp_path, capsys):
    router = tmp_path / "router.safetensors"
    base = ["router", "--out", str(router), "--model", str(tiny_model_dir)]
    assert main([*base, "--domains", f"{corpus_dir},atlantis", *ROUTER_ARGS]) == 2
    assert "'atlantis' is neither a domain" in capsys.readouterr().err
    assert main([*base, "--domains", str(corpus_dir), *ROUTER_ARGS[:2], "--route-after", "3",
                 *ROUTER_ARGS[4:]]) == 2
    assert "route_after must leave blocks to skip" in capsys.readouterr().err
    assert main([*base, "--domains", str(corpus_dir), *ROUTER_ARGS, "--skipped", "3"]) == 2
    assert "can skip 1 to 2 blocks" in capsys.readouterr().err
    assert main([*base, "--domains", str(corpus_dir), *ROUTER_ARGS, "--search-windows", "50000"]) == 2
    assert "more than search_windows=50000" in capsys.readouterr().err
    assert main([*base, "--domains", str(corpus_dir), *ROUTER_ARGS, "--max-swaps", "-1"]) == 2
    assert "max swaps must be at least 0" in capsys.readouterr().err
    assert not router.exists()
    router.write_text("not a router")
    assert main([*base, "--domains", str(corpus_dir), *ROUTER_ARGS]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["route", str(router), "--prompt", "hello"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert router.read_text() == "not a router"


def test_a_recipe_sets_the_fit_options_and_options_beside_it_override_it(tiny_model_dir, corpus_dir, tmp_path,
                                                                        capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "block", "--target", "none", *FIT_ARGS]) == 0
    recipe = json.loads((run / "config.json").read_text())
    recipe["fit"] |= {"seed": 3, "guide_lr": 0.07, "schedule": "constant"}  # settings beyond the README's options too
    recipe["prior"]["temperature"] = 0.4
    recipe["extraction"] = {"target": "2layers"}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    again = tmp_path / "again"
    assert main(["fit", "--recipe", str(tmp_path / "recipe.json"), "--out", str(again), "--steps", "2"]) == 0
    made = json.loads((again / "config.json").read_text())
    assert made["fit"] == {**recipe["fit"], "steps": 2} and made["gate"]["units"] == ["block"]
    assert made["model"] == recipe["model"] and made["data"] == recipe["data"] and made["prior"] == recipe["prior"]
    assert json.loads((again / "extracted" / EXTRACTION_FILE).read_text())["target"] == "2 layers"

    for text, message in (('{"fit": {"stpes": 3}}', "stpes"), ("{fit", "not valid JSON"),
                          ('{"extraction": {"size": 1}}', "extraction")):
        (tmp_path / "bad.json").write_text(text)
        assert main(["fit", "--recipe", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_options_are_the_config_fields_with_their_defaults():
    from bayesprune import DataConfig, ExtractionConfig, RunConfig
    from bayesprune.core.config import DepthConfig, DraftConfig, RouterConfig
    from bayesprune.run.cli import _config, _run_config, build_parser

    parser = build_parser()
    fit = parser.parse_args(["fit", "--out", "x"])
    assert _run_config(fit) == RunConfig() and _config(ExtractionConfig, fit) == ExtractionConfig()
    assert _run_config(parser.parse_args(["fit", "--out", "x", "--units", "block,mlp", "--cost", "0.5",
                                          "--temperature", "0.3", "--gradient-checkpointing"])) == RunConfig(
        gate=bp.GateConfig(units=("block", "mlp")), cost=bp.CostConfig(fixed=0.5),
        prior=bp.PriorConfig(temperature=0.3), fit=bp.FitConfig(gradient_checkpointing=True))
    for argv, kind in ((["depth", "RUN"], DepthConfig), (["draft", "RUN", "--out", "x"], DraftConfig),
                       (["router", "--out", "x"], RouterConfig)):
        assert _config(kind, parser.parse_args(argv)) == kind()
    assert _config(DraftConfig, parser.parse_args(["draft", "RUN", "--out", "x", "--sizes", "0.5, 12layers"])).sizes \
        == ("0.5", "12layers")
    assert DataConfig().eval_tokens == parser.parse_args(["evaluate"]).eval_tokens
