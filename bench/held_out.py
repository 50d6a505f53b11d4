"""Leave one domain out: how a pruned general model does on text of a kind it never saw.

For every domain ``d`` of ``--domains`` (default: every packaged domain), each method is fitted or
calibrated on the mixture of the *other* domains (``--data`` of their names: equal shares, split by
document) and scored on ``d``'s test split (held out) and on that mixture's test split (in domain),
at each ``--targets`` share of decoder parameters kept:

* ``bayesprune``: the default fit (adapters with the gates, NLL, 750 steps) on the mixture, once per
  ``--seeds`` seed, extracted as ``bayesprune extract RUN`` does it (half the adapters' change merged,
  then recovery fine-tuning on the mixture's fit split, 50 steps at 75 % kept and more for a deeper cut; ``--set extraction.adapter_share=1``
  merges all of it, ``extraction.recovery_steps=0`` skips the recovery); ``bayesprune+ls`` and
  ``bayesprune+bias`` the same with ``--reconstruction least-squares`` or ``bias`` (calibrated on the
  mixture's fit split);
* ``sparsegpt`` and ``wanda``: unstructured, the same share of non-zero decoder parameters;
* ``shortgpt`` and, asked for with ``--methods``, ``sleb``: whole blocks removed, lowest score first
  (SLEB's greedy search scores every block at every removal: about 10 minutes per domain here);
* ``dense``: the original model.

With ``--tasks continuation cloze`` every row measured also scores the zero-shot tasks of
``bayesprune.evaluation.tasks`` (``--task-items`` passages each), built from the held-out domain's test split;
a row measured without them is measured again.

Baselines are calibrated on ``--calibration-windows`` seeded fit windows of the same mixture (SLEB on
``--sleb-windows``). Every row records its
calibration and fit tokens and seconds. ``held_out.json`` is written after every row, and a rerun with
the same measurement settings keeps the rows already there (a fit's cut only if it was cut with the extraction
settings of today, every default included: each such row records them); the summary gives, per method and target,
the geometric mean of the held-out perplexities, their ratios to dense, and the in-domain figure; a
seeded method's cell is the geometric mean over its seeds, with the spread of each seed's figures.

    .venv/bin/python bench/held_out.py                       # every domain: ≈ 20 min per domain on 2 CPU cores
    .venv/bin/python bench/held_out.py --seeds 1 --methods bayesprune bayesprune+bias   # another seed
    .venv/bin/python bench/held_out.py --label kl --set 'fit.likelihood="distillation"' 'fit.steps=143' \
        --methods bayesprune                                 # other fit settings, as bayesprune[kl]
    .venv/bin/python bench/held_out.py --table               # the tables and the figure of an earlier run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import extraction_config, pyplot, run_config, save_figure

import bayesprune as bp
from bayesprune.baselines import baseline_plan, block_scores, prune_unstructured, sleb_scores, sparsity_for
from bayesprune.core.architectures import decoder_layers
from bayesprune.core.config import ExtractionConfig
from bayesprune.evaluation.tasks import LOCAL_TASKS, run_tasks
from bayesprune.inputs.data import DOMAINS, split_corpus, tokenize
from bayesprune.run.extract_job import run_extract
from bayesprune.run.fit_job import run_fit
from bayesprune.run.rundir import RunDir

REFITS = {"bayesprune": "none", "bayesprune+ls": "least-squares", "bayesprune+bias": "bias"}  # extraction's refit
METHODS = ["dense", *REFITS, "sparsegpt", "wanda", "shortgpt", "sleb"]
DEFAULT_METHODS = [m for m in METHODS if m != "sleb"]
_MEASUREMENT = ("eval_tokens", "calibration_windows", "sleb_windows", "seq_len")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", choices=list(DOMAINS), default=list(DOMAINS),
                        help="domains left out, one at a time")
    parser.add_argument("--targets", nargs="+", default=["0.75", "0.5"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=DEFAULT_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the bayesprune fits")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored per test split")
    parser.add_argument("--calibration-windows", type=int, default=128, help="fit windows the baselines calibrate on")
    parser.add_argument("--sleb-windows", type=int, default=8, help="fit windows SLEB's search scores")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--tasks", nargs="*", choices=LOCAL_TASKS, default=[],
                        help="zero-shot tasks on the held-out domain's test split, scored for every row")
    parser.add_argument("--task-items", type=int, default=200, help="passages per task")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="change a setting of the bayesprune fits or their extraction (JSON values), e.g. "
                             "fit.steps=140 or extraction.adapter_share=1")
    parser.add_argument("--label", default=None,
                        help="names the --set settings: their methods read bayesprune[LABEL], their runs go under it")
    parser.add_argument("--runs", default=None,
                        help="where the bayesprune fits go, one per domain and seed (default runs/held-out[-LABEL])")
    parser.add_argument("--out", default="bench/results/held_out.json")
    parser.add_argument("--table", action="store_true", help="only print the tables of --out and redraw its figure")
    args = parser.parse_args()
    if args.set and not args.label:
        parser.error("--set needs a --label to name its settings")
    args.runs = args.runs or "runs/held-out" + (f"-{args.label}" if args.label else "")
    extraction_config(args.set)  # refused now, not after the first fit
    return args


class Results:
    """Rows measured so far (an earlier run's, when its measurement settings match), written after each one."""

    def __init__(self, args, settings: dict):
        self.out, self.settings, self.rows, self.started = Path(args.out), settings, [], time.time()
        if self.out.is_file():
            earlier = json.loads(self.out.read_text())
            if all(earlier["settings"].get(k) == settings.get(k) for k in _MEASUREMENT):
                self.rows = earlier["rows"]
                print(f"keeping {len(self.rows)} rows of {self.out}", flush=True)

    @staticmethod
    def _key(row: dict) -> tuple:
        return row["left_out"], row["method"], row["target"], row.get("seed")

    def has(self, left_out: str, method: str, target: str, seed: int | None = None, tasks: dict | None = None,
            extraction: dict | None = None) -> bool:
        """Whether the row is measured, with ``tasks`` (``{"items": n, "names": [...]}``) scored when given, and
        cut with the ``extraction`` settings (every default included) when given."""
        def scored(row: dict) -> bool:
            measured = row.get("tasks", {})
            return measured.get("items") == tasks["items"] and all(n in measured for n in tasks["names"])
        return any(self._key(r) == (left_out, method, target, seed) and (not tasks or scored(r))
                   and (extraction is None or r.get("extraction") == extraction) for r in self.rows)

    def add(self, row: dict) -> None:
        """Record ``row``, in place of an earlier measurement of the same row."""
        earlier = [i for i, r in enumerate(self.rows) if self._key(r) == self._key(row)]
        if earlier:
            self.rows[earlier[0]] = row
        else:
            self.rows.append(row)
        seed = "" if row.get("seed") is None else f"seed {row['seed']}"
        print(f"{row['left_out']:<12} {row['method']:<14} {seed:<7} {row['target']:>5} kept {row['fraction']:.3f}  "
              f"held out {row['held_out']:9.2f}  in domain {row['in_domain']:8.2f}", flush=True)
        result = {"rows": self.rows, "settings": self.settings, "summary": summary(self.rows),
                  "machine": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(self.out)


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def _by_domain(members: list[dict], key: str) -> dict[str, float]:
    """Per domain left out, ``key``'s geometric mean over the rows (a seeded method's seeds)."""
    domains = dict.fromkeys(r["left_out"] for r in members)
    return {d: geometric_mean([r[key] for r in members if r["left_out"] == d]) for d in domains}


TASK_METRICS = {"continuation": "acc_norm", "cloze": "acc"}  # the accuracy each task's tables show


def task_scores(members: list[dict]) -> dict[str, dict[str, float]]:
    """Per task, per domain left out: its accuracy, the mean over the rows (a seeded method's seeds) that scored it."""
    out = {}
    for task, metric in TASK_METRICS.items():
        scored = [r for r in members if task in r.get("tasks", {})]
        domains = dict.fromkeys(r["left_out"] for r in scored)
        values = {d: [r["tasks"][task][metric] for r in scored if r["left_out"] == d] for d in domains}
        if values:
            out[task] = {d: sum(v) / len(v) for d, v in values.items()}
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Per method and target, over the domains left out: the geometric means (of each domain's geometric mean over
    seeds), the worst ratio to dense, and for seeded methods each seed's geometric mean over the domains."""
    dense = {r["left_out"]: r for r in rows if r["method"] == "dense"}
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method, target in sorted(dict.fromkeys((r["method"], r["target"]) for r in rows),
                                 key=lambda pair: (methods.index(pair[0]), -float(pair[1]))):
        members = [r for r in rows if (r["method"], r["target"]) == (method, target) and r["left_out"] in dense]
        if not members:  # no dense row to compare with
            continue
        held_out, in_domain = _by_domain(members, "held_out"), _by_domain(members, "in_domain")
        ratios = {d: value / dense[d]["held_out"] for d, value in held_out.items()}
        seeds = sorted({r["seed"] for r in members if r.get("seed") is not None})
        by_seed = {}
        for seed in seeds:
            own = [r for r in members if r.get("seed") == seed]
            if {r["left_out"] for r in own} == set(held_out):
                by_seed[str(seed)] = {"held_out_geomean": geometric_mean([r["held_out"] for r in own]),
                                      "in_domain_geomean": geometric_mean([r["in_domain"] for r in own])}
        out.append({"method": method, "target": target, "domains": sorted(held_out), "seeds": seeds,
                    "fraction": sum(r["fraction"] for r in members) / len(members),
                    "held_out": held_out, "in_domain": in_domain,
                    "held_out_geomean": geometric_mean(list(held_out.values())),
                    "in_domain_geomean": geometric_mean(list(in_domain.values())),
                    "held_out_ratio_to_dense": ratios, "worst_ratio_to_dense": max(ratios.values()),
                    "by_seed": by_seed, "tasks": task_scores(members)})
    return out


def tasks_markdown(rows: list[dict]) -> str:
    """Zero-shot accuracy on the held-out domain, per task: continuation ``acc_norm`` / cloze ``acc``."""
    domains = list(dict.fromkeys(r["left_out"] for r in rows if r.get("tasks")))
    if not domains:
        return ""
    lines = ["| method | target | " + " | ".join(f"{d} held out" for d in domains) + " | mean |",
             "|---|---|" + "---|" * (len(domains) + 1)]
    for s in summary(rows):
        if not s["tasks"]:
            continue
        scores = [s["tasks"].get(task, {}) for task in TASK_METRICS]

        def cell(values: list) -> str:
            return " / ".join("–" if v is None else f"{100 * v:.1f}" for v in values)

        means = [sum(t.values()) / len(t) if t else None for t in scores]
        complete = all(len(t) == len(domains) for t in scores)
        lines.append(f"| {s['method']} | {s['target']} | " + " | ".join(cell([t.get(d) for t in scores])
                                                                       for d in domains)
                     + f" | {cell(means)}{'' if complete else ' (not every domain)'} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The summary as a table: a seeded method's cells are geometric means over its seeds, with their range."""
    domains = list(dict.fromkeys(r["left_out"] for r in rows))
    lines = ["| method | target | seeds | " + " | ".join(f"{d} held out" for d in domains)
             + " | geomean held out | geomean in domain |", "|---|---|---|" + "---|" * (len(domains) + 2)]
    for s in summary(rows):
        members = [r for r in rows if (r["method"], r["target"]) == (s["method"], s["target"])]

        def cell(domain: str) -> str:
            values = [r["held_out"] for r in members if r["left_out"] == domain]
            if not values:
                return ""
            spread = f" ({min(values):,.1f}–{max(values):,.1f})" if len(values) > 1 else ""
            return f"{s['held_out'][domain]:,.1f}{spread}"

        def overall(key: str) -> str:
            values = [v[key] for v in s["by_seed"].values()]
            spread = f" ({min(values):,.1f}–{max(values):,.1f})" if len(values) > 1 else ""
            return f"{s[key]:,.1f}{spread}"

        seeds = ", ".join(map(str, s["seeds"])) or "–"
        partial = f" ({len(s['domains'])} of {len(domains)} domains)" if len(s["domains"]) < len(domains) else ""
        lines.append(f"| {s['method']} | {s['target']} | {seeds} | " + " | ".join(cell(d) for d in domains)
                     + f" | {overall('held_out_geomean')}{partial} | {overall('in_domain_geomean')}{partial} |")
    return "\n".join(lines)


def print_tasks(rows: list[dict]) -> None:
    table = tasks_markdown(rows)
    if table:
        print("\nzero-shot on the held-out domain, % (continuation acc_norm / cloze acc):\n" + table)


def plot(rows: list[dict], path: Path) -> None:
    """One panel per domain left out: held-out perplexity against the share kept, a line per method."""
    plt = pyplot()
    domains = list(dict.fromkeys(r["left_out"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    colors = {method: f"C{i % 10}" for i, method in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(domains), figsize=(3.6 * len(domains) + 1.5, 3.8), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        members = [r for r in rows if r["left_out"] == domain]
        for method in dict.fromkeys(r["method"] for r in members if r["method"] != "dense"):
            own = [r for r in members if r["method"] == method]
            targets = sorted({r["target"] for r in own}, key=float)
            points = [[r for r in own if r["target"] == t] for t in targets]
            line = ax.plot([sum(r["fraction"] for r in p) / len(p) for p in points],
                           [geometric_mean([r["held_out"] for r in p]) for p in points], "o-",
                           lw=2.2 if method.startswith("bayesprune") else 1.0, ms=4, label=method,
                           color=colors[method])[0]
            if any(len(p) > 1 for p in points):
                ax.scatter([r["fraction"] for r in own], [r["held_out"] for r in own], s=8, color=line.get_color())
        for r in members:
            if r["method"] == "dense":
                ax.axhline(r["held_out"], color="k", lw=0.7, label="dense")
        ax.set(title=f"{domain} left out", xlabel="share of decoder parameters kept", yscale="log")
        ax.invert_xaxis()
    axes[0][0].set_ylabel("held-out test perplexity (log scale)")
    legend = {}
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(legend.values()), list(legend), loc="center right", fontsize=7)
    save_figure(fig, path, rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))


def fitted_run(args, mixture: str, left_out: str, seed: int) -> tuple[Path, dict]:
    """The fit of ``--set``'s settings on ``mixture`` with ``seed`` (fitted now if it is not there) and its
    report."""
    path = Path(args.runs) / f"{left_out}-seed{seed}"
    config = run_config(args.set, seed=seed)
    config.data.path = mixture
    if not (path / RunDir.POSTERIOR).is_file():
        print(f"fitting the gates on {mixture} with seed {seed} into {path}", flush=True)
        run_fit(config, path, ExtractionConfig(target=None), progress=True, log=lambda message: None)
    report = json.loads((path / "report.json").read_text())
    wanted = json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k != "extraction"}))
    if {k: v for k, v in report["config"].items() if k in wanted} != wanted:
        raise SystemExit(f"{path} holds a fit with other settings than --set {args.set}; give another --label")
    return path, report


def main() -> None:
    args = parse_args()
    if args.table:
        rows = json.loads(Path(args.out).read_text())["rows"]
        print(markdown(rows))
        print_tasks(rows)
        plot(rows, Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(2)
    results = Results(args, {**vars(args), "how": "one process, 2 threads; perplexity over non-overlapping "
                                                 "256-token windows of the first eval_tokens of each test split"})
    model, tokenizer = bp.load_model(None)
    totals_params = bp.model_size(model)["parameters"]
    for left_out in args.domains:
        mixture = ",".join(d for d in DOMAINS if d != left_out)
        data = bp.DataConfig(path=mixture)
        splits = {name: tokenize(tokenizer, docs) for name, docs in split_corpus(data).items()}
        held_out_documents = split_corpus(bp.DataConfig(path=left_out))["test"]
        tests = {"held_out": tokenize(tokenizer, held_out_documents), "in_domain": splits["test"]}
        tasks = {"items": args.task_items, "names": args.tasks} if args.tasks else None
        fit_windows = bp.windows(splits["fit"], args.seq_len)
        pick = torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(0))
        calibration = fit_windows[pick[:args.calibration_windows]]

        def add(method: str, target: str, network, fraction: float, **record) -> None:
            scores = {name: bp.perplexity(network, tokens, 256, args.eval_tokens, progress=False)["perplexity"]
                      for name, tokens in tests.items()}
            if tasks:
                started = time.time()
                scores["tasks"] = {"items": args.task_items, **run_tasks(network, tokenizer, args.tasks,
                                                                         held_out_documents, limit=args.task_items),
                                   "seconds": time.time() - started}
            results.add({"left_out": left_out, "mixture": mixture, "method": method, "target": target,
                         "fraction": fraction, **scores, **record})

        def wanted(method: str, seed: int | None = None, name: str | None = None,
                   reconstruction: str | None = None) -> list[str]:
            """The targets still to measure; a fit's cut counts as measured only if cut with today's settings."""
            targets = ["1.0"] if method == "dense" else args.targets
            return [t for t in targets if method in args.methods and not results.has(
                left_out, name or method, t, seed, tasks,
                extraction_config(args.set, target=t, reconstruction=reconstruction).to_dict()
                if reconstruction else None)]

        for target in wanted("dense"):
            add("dense", target, model, 1.0, parameters=totals_params, calibration_tokens=0, fit_tokens=0, seconds=0.0)
        for seed in args.seeds:
            for method, reconstruction in REFITS.items():
                name = method.replace("bayesprune", f"bayesprune[{args.label}]") if args.label else method
                for target in wanted(method, seed, name, reconstruction):
                    run, report = fitted_run(args, mixture, left_out, seed)
                    fit = report["config"]["fit"]
                    started = time.time()
                    with tempfile.TemporaryDirectory(dir=Path(args.runs)) as scratch:
                        extraction = extraction_config(args.set, target=target, reconstruction=reconstruction)
                        record = run_extract(run, extraction, Path(scratch) / "small", streaming=False, progress=False)
                        small = bp.load_pruned(Path(scratch) / "small")
                        seconds = time.time() - started
                        add(name, target, small, record["fraction_of_decoder"], seed=seed,
                            parameters=record["parameters"], fit_seconds=report["wall_seconds"],
                            fit_tokens=fit["steps"] * fit["batch_size"] * fit["seq_len"],
                            calibration_tokens=extraction.calibration_tokens if reconstruction != "none" else 0,
                            seconds=seconds, refit=record.get("reconstruction"), recovery=record.get("recovery"),
                            settings=args.set, extraction=extraction.to_dict())
        for method in ("sparsegpt", "wanda"):
            for target in wanted(method):
                pruned = copy.deepcopy(model)
                result = prune_unstructured(pruned, calibration, method, sparsity_for(pruned, float(target)),
                                            progress=False)
                add(method, target, pruned, result.kept_fraction, calibration_tokens=result.calibration_tokens,
                    fit_tokens=0, seconds=result.seconds)
                del pruned
        for method in ("shortgpt", "sleb"):
            targets = wanted(method)
            if not targets:
                continue
            started = time.time()
            if method == "sleb":
                depth = len(decoder_layers(model)) - min(len(baseline_plan(model, block_scores("drop-last", model),
                                                                          t).layers) for t in targets)
                windows = fit_windows[pick[:args.sleb_windows]]
                scores = sleb_scores(model, windows, num_remove=depth, progress=False)
            else:
                windows = calibration
                scores = block_scores(method, model, windows, progress=False)
            seconds = time.time() - started
            for target in targets:
                plan = baseline_plan(model, scores, target)
                add(method, target, bp.extract_model(model, plan), plan.fraction, calibration_tokens=windows.numel(),
                    fit_tokens=0, seconds=seconds, kept_layers=len(plan.layers))
    print(markdown(results.rows))
    print_tasks(results.rows)
    plot(results.rows, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')} in {time.time() - results.started:.0f} s")


if __name__ == "__main__":
    main()
