"""One fit over every cost vs separate fixed-cost fits (the same model, cost held fixed), with predicted quality.

1. The default fit of head+neuron gates (frozen weights, a cost drawn every step).
2. For each comparison target (75/50/35 %), a fixed-cost fit at the cost the curve
   solves for that target (same meaning of λ in both models).
3. Test perplexity of the extracted sub-network at every frontier target: from the
   one amortised fit, and from each fixed-cost fit at its own target.
4. Predicted perplexity before extracting, from a few validation windows drawn at
   random from the first ``--eval-tokens`` of the validation split: the plan's
   hard-gated sub-network (bootstrap band over windows) and sub-networks sampled at
   the solved cost (band over masks and windows). The extracted model is then
   measured on all of those validation tokens; coverage = how often that measured
   perplexity falls inside each band. (Test perplexity is reported too; validation
   and test are different works, so their levels differ.)
5. Posterior-predictive ensembles of S sub-networks sampled at a cost vs the single
   plan sub-network, on test windows.

Writes ``bench/results/amortised.json`` and figures beside it: perplexity vs cost,
kept fraction vs cost, stability over mask draws, threshold curves, the frontier.

    .venv/bin/python bench/amortised.py            # ≈ 1 h on 2 CPU cores
    .venv/bin/python bench/amortised.py --quick    # smoke run: tiny budgets, 4-step fits
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from common import pyplot, save_figure, write_results

import bayesprune as bp
from bayesprune.run.fit_job import run_fit
from bayesprune.run.plots import plot_thresholds
from bayesprune.core.posterior import cost_grid
from bayesprune.run.rundir import RunDir
from bayesprune.evaluation.prediction import ensemble_nll, plan_quality, predicted_quality


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/amortised-bench", help="folder for the fits (reused if there)")
    parser.add_argument("--amortised-steps", type=int, default=300)
    parser.add_argument("--fixed-steps", type=int, default=150)
    parser.add_argument("--offset-scale", type=float, default=bp.PriorConfig.offset_scale,
                        help="prior scale of the amortised fit's per-unit importance offsets (0: none)")
    parser.add_argument("--targets", nargs="+", default=["0.9", "0.75", "0.6", "0.5", "0.35", "0.25"])
    parser.add_argument("--fixed-targets", nargs="*", default=["0.75", "0.5", "0.35"])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--validation-windows", type=int, default=8, help="256-token validation windows")
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--ensemble", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure of --out from its JSON")
    parser.add_argument("--out", default="bench/results/amortised.json")
    args = parser.parse_args()
    if args.quick:
        args.amortised_steps = args.fixed_steps = 4
        args.targets, args.fixed_targets = ["0.75", "0.5"], ["0.5"]
        args.eval_tokens, args.validation_windows, args.masks, args.ensemble = 512, 2, 2, 2
        args.runs, args.out = "bench/results/quick/amortised-runs", "bench/results/amortised-quick.json"
    return args


def fit_run(path: Path, steps: int, eval_tokens: int, cost: float | None = None,
            offset_scale: float = bp.PriorConfig.offset_scale) -> Path:
    """A fitted run at ``path``: every cost (``cost=None``) or one fixed cost; fitted now if missing."""
    config = bp.RunConfig(gate=bp.GateConfig(units=("head", "neuron")), cost=bp.CostConfig(fixed=cost))
    config.fit.steps, config.data.eval_tokens = steps, eval_tokens
    config.prior.offset_scale = offset_scale
    if not (path / RunDir.POSTERIOR).is_file():
        print(f"fitting {path}", flush=True)
        run_fit(config, path, bp.ExtractionConfig(target=None), log=lambda message: None)
    return path


def main() -> None:
    args = parse_args()
    if args.replot:
        result = json.loads(Path(args.out).read_text())
        plot(result["rows"], result["sweep"], result["size_curve"], result["dense_perplexity"],
             Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(2)
    started = time.time()
    runs = Path(args.runs)
    curve = bp.GatePosterior.load(fit_run(runs / "amortised", args.amortised_steps, args.eval_tokens,
                                          offset_scale=args.offset_scale) / RunDir.POSTERIOR)
    model, tokenizer = bp.load_model()
    splits = bp.load_splits(tokenizer, bp.DataConfig(path="shakespeare"))
    totals = bp.ModelTotals.of(model)
    test = splits["test"]
    held_out = bp.windows(splits["validation"], 256)[:max(1, args.eval_tokens // 256)]
    pick = torch.randperm(held_out.shape[0], generator=torch.Generator().manual_seed(0))[:args.validation_windows]
    validation = held_out[pick]

    def test_perplexity(m) -> float:
        return bp.perplexity(m, test, 256, args.eval_tokens, progress=False)["perplexity"]

    dense = test_perplexity(model)
    gated = bp.gate(model, bp.GateConfig(units=curve.kinds))
    rows = []
    for target in args.targets:
        plan = curve.plan(target, totals)
        predicted = plan_quality(gated, plan, curve.amplitudes(plan.cost, point=True), validation)
        sampled = predicted_quality(gated, curve, validation, [plan.cost], args.masks, progress=False)[0]
        with gated.unwrapped() as plain:
            small = bp.extract_model(plain, plan)
            measured = test_perplexity(small)
            held = bp.perplexity(small, splits["validation"], 256, args.eval_tokens, progress=False)["perplexity"]
        row = {"method": "amortised", "target": target, "cost": plan.cost, "fraction": plan.fraction,
               "megabytes": plan.bytes / 1e6, "perplexity": measured, "validation_perplexity": held,
               "predicted": predicted, "sampled": sampled,
               "in_plan_band": predicted["perplexity_low"] <= held <= predicted["perplexity_high"],
               "in_sampled_band": sampled["perplexity_low"] <= held <= sampled["perplexity_high"]}
        rows.append(row)
        print(f"amortised {target:>5} cost {plan.cost:8.3f} kept {plan.fraction:.3f}: test {measured:9.2f}  "
              f"validation {held:9.2f}  "
              f"predicted {predicted['perplexity']:.2f} [{predicted['perplexity_low']:.2f}, "
              f"{predicted['perplexity_high']:.2f}]  sampled {sampled['perplexity']:.2f} "
              f"[{sampled['perplexity_low']:.2f}, {sampled['perplexity_high']:.2f}]", flush=True)
    for target in args.fixed_targets:
        cost = curve.solve(target, totals)
        run = fit_run(runs / f"fixed-{target}", args.fixed_steps, args.eval_tokens, cost)
        posterior = bp.GatePosterior.load(run / RunDir.POSTERIOR)
        with gated.unwrapped() as plain:
            small, plan = bp.extract(plain, posterior, target)
            measured = test_perplexity(small)
        rows.append({"method": "fixed-cost", "target": target, "cost": cost, "fraction": plan.fraction,
                     "megabytes": plan.bytes / 1e6, "perplexity": measured})
        print(f"fixed     {target:>5} cost {cost:8.3f} kept {plan.fraction:.3f}: test {measured:9.2f}", flush=True)
    sweep = predicted_quality(gated, curve, validation, cost_grid(12, 20.0), args.masks, progress=False)
    size_curve = curve.size_curve(cost_grid(25, 20.0), totals)
    test_windows = bp.windows(test, 256)[:max(1, args.eval_tokens // 256)]
    ensembles = []
    for target in args.fixed_targets:
        plan = curve.plan(target, totals)
        single = plan_quality(gated, plan, curve.amplitudes(plan.cost, point=True), test_windows)
        mixture = ensemble_nll(gated, curve, test_windows, plan.cost, args.ensemble)
        ensembles.append({"target": target, "cost": plan.cost, "plan_perplexity": single["perplexity"],
                          "ensemble_perplexity": math.exp(mixture["ensemble_nll"]),
                          "member_perplexities": [math.exp(v) for v in mixture["member_nll"]],
                          "member_fractions": mixture["member_fractions"]})
        print(f"ensemble  {target:>5}: plan {single['perplexity']:.2f}, ensemble of {args.ensemble} "
              f"{ensembles[-1]['ensemble_perplexity']:.2f}", flush=True)
    gated.remove()
    amortised = [r for r in rows if r["method"] == "amortised"]
    coverage = {"plan_band": sum(r["in_plan_band"] for r in amortised) / len(amortised),
                "sampled_band": sum(r["in_sampled_band"] for r in amortised) / len(amortised)}
    print(f"coverage of measured validation perplexity: plan band {coverage['plan_band']:.2f}, "
          f"sampled band {coverage['sampled_band']:.2f}")
    plot_thresholds(curve, Path(args.out).with_name(Path(args.out).stem + "-thresholds.png"))
    write_results({"rows": rows, "dense_perplexity": dense, "sweep": sweep, "size_curve": size_curve,
                   "ensembles": ensembles, "coverage": coverage, "settings": vars(args),
                   "wall_seconds": time.time() - started, "machine": platform.platform()},
                  args.out, lambda rows_, path: plot(rows_, sweep, size_curve, dense, path))


def plot(rows: list[dict], sweep: list[dict], size_curve: list[dict], dense: float, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    costs = [r["cost"] for r in sweep]
    ax.fill_between(costs, [r["perplexity_low"] for r in sweep], [r["perplexity_high"] for r in sweep], alpha=0.3)
    ax.plot(costs, [r["perplexity"] for r in sweep], "o-", ms=3, label="sampled sub-networks (cost 0: dense)")
    ax.set(xscale="symlog", yscale="log", xlabel="cost λ", ylabel="validation perplexity", title="Perplexity vs cost")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    costs = [r["cost"] for r in size_curve]
    ax.fill_between(costs, [r["fraction_5%"] for r in size_curve], [r["fraction_95%"] for r in size_curve], alpha=0.3)
    ax.plot(costs, [r["fraction"] for r in size_curve], "-")
    ax.set(xscale="symlog", xlabel="cost λ", ylabel="fraction of decoder parameters kept", ylim=(0, 1.02),
           title="Kept size vs cost")
    ax = axes[1, 0]
    for r in sweep:
        ax.scatter([r["fraction"]] * len(r["mask_perplexities"]), r["mask_perplexities"], s=8, color="C0")
    ax.set(yscale="log", xlabel="kept fraction (mean over masks)", ylabel="perplexity of one mask draw",
           title="Stability over mask draws (validation)")
    ax.invert_xaxis()
    ax = axes[1, 1]
    for method, style in (("amortised", "o-"), ("fixed-cost", "s")):
        members = sorted((r for r in rows if r["method"] == method), key=lambda r: r["fraction"])
        ax.plot([r["megabytes"] for r in members], [r["perplexity"] for r in members], style, label=method)
    amortised = sorted((r for r in rows if r["method"] == "amortised"), key=lambda r: r["fraction"])
    ax.plot([r["megabytes"] for r in amortised], [r["validation_perplexity"] for r in amortised], "^",
            color="C2", label="amortised, measured on validation")
    ax.errorbar([r["megabytes"] for r in amortised], [r["predicted"]["perplexity"] for r in amortised],
                yerr=[[r["predicted"]["perplexity"] - r["predicted"]["perplexity_low"] for r in amortised],
                      [r["predicted"]["perplexity_high"] - r["predicted"]["perplexity"] for r in amortised]],
                fmt="none", color="C2", capsize=3, label="predicted from validation windows (90 %)")
    ax.axhline(dense, color="k", lw=0.6, label="dense (test)")
    ax.set(yscale="log", xlabel="size of the extracted model (MB = 10⁶ bytes)",
           ylabel="perplexity (test unless marked)",
           title="Size–quality frontier")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
