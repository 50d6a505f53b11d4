"""How much of the fitted adapters a cut should keep: held-out and in-domain perplexity against the share.

Reads leave-one-domain-out fits that ``held_out.py`` made (``RUNS/<domain>-seed<s>``: fitted on the
mixture of the other domains), cuts each at every ``--targets`` size with every ``--shares`` share of its
adapters merged (``bayesprune extract RUN --in-memory --adapter-share S``: ``W + S · (α / r) · B A``;
1 is the whole fitted change, 0 the original weights cut by the fitted plan), and scores the cut on
``--eval-tokens`` of the left-out domain's test split (held out) and of the mixture's test split (in
domain), over 256-token windows. Writes JSON and a figure of the geometric means over the runs.

    .venv/bin/python bench/adapter_share.py --runs runs/held-out        # ≈ 13 s per cut on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from common import pyplot, save_figure, write_results

import bayesprune as bp
from bayesprune.core.config import ExtractionConfig
from bayesprune.inputs.data import DOMAINS, split_corpus, tokenize
from bayesprune.run.extract_job import run_extract
from bayesprune.run.rundir import RunDir, read_config

EVAL_WINDOW = 256


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["runs/held-out"],
                        help="folders of held_out.py's fits (<domain>-seed<s> inside)")
    parser.add_argument("--shares", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25, 0.0])
    parser.add_argument("--targets", nargs="+", default=["0.75", "0.5"])
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored per test split")
    parser.add_argument("--out", default="bench/results/adapter-share.json")
    return parser.parse_args()


def fold_runs(folders: list[str]) -> list[tuple[Path, str]]:
    """Every finished fit in ``folders`` with the domain it left out (the one of its name that its data lacks)."""
    found = []
    for folder in folders:
        for run in sorted(Path(folder).glob("*-seed*")):
            if (run / RunDir.POSTERIOR).is_file():
                left_out = run.name.rsplit("-seed", 1)[0]
                if left_out not in DOMAINS or left_out in read_config(run).data.path.split(","):
                    raise SystemExit(f"{run} is not a leave-one-domain-out fit")
                found.append((run, left_out))
    if not found:
        raise SystemExit(f"no finished fits in {folders}")
    return found


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(rows: list[dict]) -> list[dict]:
    """Per target and share: the geometric means over the runs, held out and in domain."""
    keys = sorted({(r["target"], r["share"]) for r in rows}, key=lambda k: (-float(k[0]), -k[1]))
    return [{"target": t, "share": s, "runs": len(group),
             **{name: geometric_mean([r[name] for r in group]) for name in ("held_out", "in_domain")}}
            for t, s in keys for group in [[r for r in rows if (r["target"], r["share"]) == (t, s)]]]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    means = summary(rows)
    targets = sorted({r["target"] for r in means}, key=float, reverse=True)
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for name, style in (("held_out", "o-"), ("in_domain", "s--")):
            points = sorted((r["share"], r[name]) for r in means if r["target"] == target)
            ax.plot(*zip(*points), style, label=name.replace("_", " ") + " (geometric mean)")
        ax.set(title=f"{float(target):.0%} of decoder parameters kept", xlabel="share of the adapters merged",
               ylabel="perplexity")
        ax.legend()
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    started = time.time()
    runs = fold_runs(args.runs)
    _, tokenizer = bp.load_model(None)
    rows = []
    for run, left_out in runs:
        mixture = read_config(run).data.path
        tests = {"held_out": tokenize(tokenizer, split_corpus(bp.DataConfig(path=left_out))["test"]),
                 "in_domain": tokenize(tokenizer, split_corpus(bp.DataConfig(path=mixture))["test"])}
        for share in args.shares:
            for target in args.targets:
                cut_started = time.time()
                with tempfile.TemporaryDirectory() as scratch:
                    record = run_extract(run, ExtractionConfig(target=target, adapter_share=share),
                                         Path(scratch) / "small", streaming=False, progress=False)
                    small = bp.load_pruned(Path(scratch) / "small")
                    scores = {name: bp.perplexity(small, tokens, EVAL_WINDOW, args.eval_tokens,
                                                  progress=False)["perplexity"] for name, tokens in tests.items()}
                rows.append({"run": str(run), "left_out": left_out, "target": target, "share": share,
                             "fraction": record["fraction_of_decoder"], **scores,
                             "seconds": time.time() - cut_started})
                print(f"{run} {target} share {share}: held out {scores['held_out']:.2f}, in domain "
                      f"{scores['in_domain']:.2f}", flush=True)
    for row in summary(rows):
        print(f"{row['target']} share {row['share']}: held out {row['held_out']:.2f}, in domain "
              f"{row['in_domain']:.2f} (geometric means over {row['runs']} fits)")
    write_results({"how": "one process, 2 threads; perplexity over non-overlapping 256-token windows of the first "
                          "eval_tokens of each test split; each cut extracted in memory from the run",
                   "settings": vars(args), "seconds": time.time() - started, "summary": summary(rows), "rows": rows},
                  args.out, plot)


if __name__ == "__main__":
    main()
