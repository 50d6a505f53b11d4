"""Speculative decoding with bayesprune drafts against plain greedy decoding, side by side.

One target (the default model, in each ``--dtypes``), its plain greedy ``generate`` on
prompts from the held-out Shakespeare plays and KJV books, then assisted generation
with: drafts extracted from one fit at several sizes (uniform form, plain
transformers), each with and without a trimmed vocabulary; self-speculation (the
target with the depth ranking's least-needed blocks skipped, shared weights); and, for
the draft ``bayesprune draft`` picks, transformers' own drafting loop beside
bayesprune's direct one. For every row: tokens/s, speed-up over plain decoding,
measured acceptance α and tokens per target call, predicted α, c, γ and speed-up, and
whether every output equals plain decoding token for token.

    .venv/bin/python bench/speculative.py --run runs/default --depth-run runs/depth-estimators/straight-through
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
from common import pyplot, save_figure, write_results

import bayesprune as bp
from bayesprune.speculative import decoding as sp
from bayesprune.inputs.data import bible_path, load_splits, split_corpus, tokenize
from bayesprune.run.drafts import prediction, rank_drafts, self_draft, target_continuations
from bayesprune.run.rundir import load_fitted, load_fitted_model
from bayesprune.run.rundir import read_config


def prompts(tokenizer, count: int, length: int) -> dict[str, list[torch.Tensor]]:
    """``count`` prompts of ``length`` tokens from each corpus's test split, evenly spaced."""
    out = {}
    for name, path in (("shakespeare", None), ("kjv", str(bible_path()))):
        tokens = tokenize(tokenizer, split_corpus(bp.DataConfig(path=path))["test"])
        stride = (tokens.numel() - length) // count
        out[name] = [tokens[i * stride: i * stride + length][None] for i in range(count)]
    return out


def decode(target, corpus_prompts, new_tokens: int, draft=None, direct: bool = True) -> dict:
    """Greedy generation of every prompt; outputs, seconds and acceptance counts."""
    outputs, counts = {}, {name: sp.AcceptanceCounts() for name in corpus_prompts}
    started = time.perf_counter()
    for name, group in corpus_prompts.items():
        outputs[name] = []
        for ids in group:
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
            if draft is None:
                outputs[name].append(target.generate(ids, **kwargs))
                continue
            with (sp.direct_drafting(target) if direct else contextlib.nullcontext()), \
                    sp.count_acceptance(target) as c:
                outputs[name].append(target.generate(ids, assistant_model=draft, **kwargs))
            counts[name].drafted += c.drafted
            counts[name].accepted += c.accepted
    seconds = time.perf_counter() - started
    tokens = new_tokens * sum(len(g) for g in corpus_prompts.values())
    return {"outputs": outputs, "seconds": seconds, "tokens_per_s": tokens / seconds, "counts": counts}


def agreement(a: dict, b: dict, prompt_tokens: int) -> dict:
    """How many outputs equal the reference, and the share of new tokens before the first difference."""
    pairs = [(x[0, prompt_tokens:], y[0, prompt_tokens:]) for name in a for x, y in zip(a[name], b[name])]
    prefix = [int((x != y).nonzero()[0]) if (x != y).any() else len(x) for x, y in pairs]
    return {"identical": all(torch.equal(x, y) for x, y in pairs),
            "identical_outputs": sum(torch.equal(x, y) for x, y in pairs), "outputs": len(pairs),
            "share_before_first_difference": sum(prefix) / sum(len(x) for x, _ in pairs)}


@torch.inference_mode()
def bench_dtype(args, dtype: str) -> tuple[list[dict], dict]:
    target, tokenizer = load_fitted_model(args.run, dtype=dtype)
    corpus_prompts = prompts(tokenizer, args.prompts, args.prompt_tokens)
    decode(target, {"warm": corpus_prompts["shakespeare"][:1]}, 8)
    plain = [decode(target, corpus_prompts, args.new_tokens)]
    rankings = {share: rank_drafts(args.run, sizes=args.sizes, vocab_share=share, dtype=dtype, progress=False)
                for share in (None, args.vocab_share)}
    posterior = load_fitted(args.run)
    totals = bp.ModelTotals.of(target)
    rows = []

    def measure(kind: str, label: str, draft, predicted: dict, direct: bool = True, **extra):
        step_ms = sp.decode_ms(draft)[1], sp.decode_ms(target)[1]  # side by side, on the same load
        result = decode(target, corpus_prompts, args.new_tokens, draft, direct)
        reference = plain[0]
        total = sp.AcceptanceCounts(sum((c.drafted for c in result["counts"].values()), []),
                                    sum((c.accepted for c in result["counts"].values()), []))
        row = {"dtype": dtype, "kind": kind, "draft": label, **extra, **predicted,
               "measured_cost_ratio": step_ms[0] / step_ms[1],
               "measured_alpha": total.alpha, "tokens_per_call": total.tokens_per_call,
               **{f"measured_alpha_{name}": c.alpha for name, c in result["counts"].items()},
               "tokens_per_s": result["tokens_per_s"],
               **agreement(result["outputs"], reference["outputs"], args.prompt_tokens)}
        rows.append(row)
        print(f"{dtype} {kind} {label}: {row['tokens_per_s']:.1f} tok/s, α {row['measured_alpha']:.3f} "
              f"(predicted {row['alpha_greedy']:.3f}), γ {row['gamma']}, identical {row['identical']}", flush=True)

    for share, ranking in rankings.items():
        vocabulary = None if ranking["vocabulary"] is None else torch.tensor(ranking["vocabulary"])
        for candidate in sorted(ranking["candidates"], key=lambda r: r["fraction"]):
            draft = bp.extract_model(target, posterior.plan(candidate["target"], totals, "uniform")).to(target.dtype)
            if vocabulary is not None:
                sp.trim_vocabulary(draft, vocabulary)
            sp.configure_draft(draft.eval(), candidate["gamma"])
            measure("extracted", candidate["described"], draft, {k: candidate[k] for k in _PREDICTED},
                    vocab_share=share, vocabulary=None if vocabulary is None else len(vocabulary))
        plain.append(decode(target, corpus_prompts, args.new_tokens))  # the machine's drift between groups

    best = max(rankings[None]["candidates"], key=lambda r: r["predicted_speedup"])
    draft = bp.extract_model(target, posterior.plan(best["target"], totals, "uniform")).to(target.dtype).eval()
    sp.configure_draft(draft, best["gamma"])
    measure("extracted, transformers' drafting loop", best["described"], draft,
            {k: best[k] for k in _PREDICTED}, direct=False, vocab_share=None)

    ranking = rankings[None]
    depth = load_fitted(args.depth_run)
    text = target_continuations(target, tokenizer, load_splits(tokenizer, read_config(args.run).data)["validation"],
                                4, 32, 48)
    dense_logits = target(text).logits[:, 31:-1]
    for blocks in args.blocks:
        draft = self_draft(target, depth, blocks)
        alpha = sp.acceptance(dense_logits, draft(text).logits[:, 31:-1])
        predicted = prediction(alpha, sp.decode_ms(draft)[1], ranking["target_ms"],
                               {int(g): v for g, v in ranking["verify_ratio"].items()})
        sp.configure_draft(draft, predicted["gamma"])
        measure("self-speculation", f"{blocks} of {target.config.num_hidden_layers} blocks", draft, predicted,
                vocab_share=None, skipped=draft.skipped_blocks)

    plain_rate = statistics.median(p["tokens_per_s"] for p in plain)
    verify = {int(g): v for g, v in ranking["verify_ratio"].items()}
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / plain_rate
        row[f"for_{args.goal}x"] = needed(args.goal, row["measured_cost_ratio"], row["measured_alpha"], verify)
    summary = {"dtype": dtype, "plain_tokens_per_s": [p["tokens_per_s"] for p in plain],
               "plain_tokens_per_s_median": plain_rate, "target_ms": ranking["target_ms"],
               "verify_ratio": ranking["verify_ratio"], "acceptance_tokens": ranking["acceptance_tokens"]}
    return rows, summary


def needed(goal: float, cost_ratio: float, alpha: float, verify: dict[int, float]) -> dict:
    """The acceptance a draft of this cost would need for ``goal``, and the cost a draft of this acceptance
    would need (best γ in 1..8 for each; None where no value reaches it)."""
    def best(a: float, c: float) -> float:
        return max(sp.expected_speedup(a, g, c, verify.get(g, 1.0)) for g in range(1, 9))

    def solve(f, increasing: bool) -> float | None:
        low, high = 0.0, 1.0
        if (f(high) if increasing else f(low)) < goal:
            return None
        for _ in range(40):
            middle = (low + high) / 2
            if (f(middle) >= goal) == increasing:
                high = middle
            else:
                low = middle
        return high if increasing else low

    return {"alpha_needed": solve(lambda a: best(a, cost_ratio), True),
            "cost_ratio_needed": solve(lambda c: best(alpha, c), False)}


_PREDICTED = ("alpha_greedy", "alpha_sampling", "draft_ms", "cost_ratio", "gamma", "predicted_speedup")


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for kind, marker in (("extracted", "o"), ("self-speculation", "s"), ("extracted, transformers' drafting loop", "^")):
        for dtype, colour in (("float32", "C0"), ("bfloat16", "C1")):
            chosen = [r for r in rows if r["kind"] == kind and r["dtype"] == dtype]
            if not chosen:
                continue
            label = f"{kind} ({dtype})"
            axes[0].scatter([r["predicted_speedup"] for r in chosen], [r["speedup"] for r in chosen],
                            marker=marker, color=colour, label=label)
            axes[1].scatter([r["alpha_greedy"] for r in chosen], [r["measured_alpha"] for r in chosen],
                            marker=marker, color=colour, label=label)
    for ax, name in ((axes[0], "speed-up over plain greedy decoding"), (axes[1], "acceptance α (greedy)")):
        low = min(ax.get_xlim()[0], ax.get_ylim()[0])
        high = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([low, high], [low, high], "k:", lw=1)
        ax.set(xlabel=f"predicted {name}", ylabel=f"measured {name}")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="width fit the drafts are cut from")
    parser.add_argument("--depth-run", default="runs/depth-estimators/straight-through",
                        help="block-gate fit whose depth ranking picks the blocks self-speculation skips")
    parser.add_argument("--sizes", default="0.35,0.5,0.65,0.8")
    parser.add_argument("--vocab-share", type=float, default=0.95)
    parser.add_argument("--blocks", default="24,20", help="blocks the self-speculative draft keeps")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per corpus")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--goal", type=float, default=1.3, help="speed-up whose needed α and c each row reports")
    parser.add_argument("--out", default="bench/results/speculative.json")
    args = parser.parse_args()
    args.sizes = [s.strip() for s in args.sizes.split(",")]
    args.blocks = [int(b) for b in args.blocks.split(",")]
    torch.set_num_threads(args.threads)
    started = time.time()
    rows, summaries = [], []
    for dtype in args.dtypes.split(","):
        dtype_rows, summary = bench_dtype(args, dtype.strip())
        rows += dtype_rows
        summaries.append(summary)
    result = {"how": {"command": "bench/speculative.py", **{k: v for k, v in vars(args).items()},
                      "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                      "torch": torch.__version__, "decoding": "greedy, batch 1, KV cache",
                      "prompts": "held-out Shakespeare plays and KJV books (test splits)"},
              "targets": summaries, "rows": rows, "wall_seconds": time.time() - started}
    write_results(result, args.out, plot)


if __name__ == "__main__":
    main()
